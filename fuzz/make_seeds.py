#!/usr/bin/env python3
"""Builds fuzz/corpus-seed/<target>/ from the signed webhook fixtures (fixtures/) and the
protocols.md §6 test vectors (fixtures/vectors/*.json, with a few written out below).

Re-run after fixtures change:  python3 fuzz/make_seeds.py
Seeds are named by the SHA-1 of their content (like libFuzzer's own corpus files), so re-runs
are idempotent and stale seeds are removed.
"""

import glob
import hashlib
import json
import os
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")
OUT = os.path.join(ROOT, "fuzz", "corpus-seed")
# Per target: at most this many seeds from fixtures (vectors and hand-written seeds always go in).
FIXTURE_CAP = 24

seeds = {t: {} for t in ["form_parse", "plivo_verify", "twilio_verify", "telnyx_verify",
                         "credentials", "settings", "client_ip"]}


def add(target, data, label=""):
    if isinstance(data, str):
        data = data.encode()
    seeds[target].setdefault(data, label)


def load_fixtures():
    out = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*", "*.json"))):
        if os.path.basename(os.path.dirname(path)) == "vectors":
            continue
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue  # a fixture still being written
        if not all(k in d for k in ("carrier", "method", "path", "headers", "body", "public_url")):
            continue
        d["headers"] = {k.lower(): v for k, v in d["headers"].items()}
        d["_name"] = os.path.relpath(path, FIXTURES)
        out.append(d)
    return out


def load_vectors(carrier):
    try:
        with open(os.path.join(FIXTURES, "vectors", carrier + ".json")) as f:
            return json.load(f)["vectors"]
    except (OSError, ValueError, KeyError):
        return []


def flags(method, is_form, ma=False):
    bits = {"POST": 0, "GET": 1, "PUT": 2}.get(method, 0)
    if not is_form:
        bits |= 4
    if ma:
        bits |= 8
    return chr(0x30 | bits)


def lines(*fields):
    return "\n".join(fields)


fixtures = load_fixtures()
counts = {t: 0 for t in seeds}


def capped(target):
    counts[target] += 1
    return counts[target] <= FIXTURE_CAP


# ---------------------------------------------------------------- form_parse
for d in fixtures:
    if d["body"] and "=" in d["body"] and capped("form_parse"):
        add("form_parse", d["body"], d["_name"])
    if "?" in d["path"]:
        add("form_parse", d["path"].split("?", 1)[1], d["_name"] + " query")
        add("form_parse", d["public_url"] + d["path"], d["_name"] + " url")
for text in [
    "EndTime=2024-05-01+10%3A00%3A00&From=%2B14155550100",
    "a%20b=c+d&k=%e2%82%AC",
    "k=&j&=v&x=1=2",
    "&a=1&&b=2&",
    "a=1;b=2",
    "a=%zz&b=%4&c=%&d=100%25",
    "a=%ff",
    "%c3=1",
    "https://h.example:8443/a/b.xml/?a=b&c=d#frag?x",
    "https://h/p#f?g",
    "https://plivobin.non-prod.plivops.com/api/v1/validate_signature03.xml/?a=b&c=d",
]:
    add("form_parse", text, "hand")

# ---------------------------------------------------------------- plivo_verify (Plivo + Vobiz)
for d in fixtures:
    if d["carrier"] not in ("plivo", "vobiz") or not capped("plivo_verify"):
        continue
    c, h = d["carrier"], d["headers"]
    is_form = h.get("content-type", "").startswith("application/x-www-form-urlencoded")
    sig = h.get(f"x-{c}-signature-v3") or h.get(f"x-{c}-signature-v2") or ""
    ma = not sig and f"x-{c}-signature-ma-v3" in h
    sig = sig or h.get(f"x-{c}-signature-ma-v3", "")
    nonce = h.get(f"x-{c}-signature-v3-nonce") or h.get(f"x-{c}-signature-v2-nonce") or ""
    token = d.get("credential", {}).get("auth_token", "")
    add("plivo_verify", lines(flags(d["method"], is_form, ma), token, d["public_url"] + d["path"], nonce, sig,
                              d["body"]), d["_name"])
for c in ("plivo", "vobiz"):
    for v in load_vectors(c):
        body = urllib.parse.urlencode([tuple(p) for p in v.get("params", [])])
        add("plivo_verify", lines(flags(v["method"], True), v["token"], v["url"], v["nonce"], v["signature"], body),
            c + " " + v["name"])

# ---------------------------------------------------------------- twilio_verify
for d in fixtures:
    if d["carrier"] != "twilio" or not capped("twilio_verify"):
        continue
    h = d["headers"]
    is_form = h.get("content-type", "").startswith("application/x-www-form-urlencoded")
    settings = "x-twilio-webhooks-signature-settings" in h
    f = chr(ord(flags(d["method"], is_form)) | (8 if settings else 0))
    add("twilio_verify", lines(f, d.get("credential", {}).get("auth_token", ""), d["public_url"] + d["path"],
                               h.get("x-twilio-signature", ""), d["body"]), d["_name"])
for v in load_vectors("twilio"):
    if v["scheme"] == "twilio-body":
        add("twilio_verify", lines(flags("POST", False), v["token"], v["url"], v["signature"], v["body"]), v["name"])
    else:
        body = urllib.parse.urlencode([tuple(p) for p in v.get("params", [])])
        add("twilio_verify", lines(flags(v["method"], True), v["token"], v["url"], v["signature"], body), v["name"])

# ---------------------------------------------------------------- telnyx_verify
for d in fixtures:
    if d["carrier"] != "telnyx" or not capped("telnyx_verify"):
        continue
    h = d["headers"]
    add("telnyx_verify", lines(d.get("credential", {}).get("public_key", ""), h.get("telnyx-signature-ed25519", ""),
                               h.get("telnyx-timestamp", ""), str(d.get("now", "")), d["body"]), d["_name"])
for v in load_vectors("telnyx"):
    add("telnyx_verify", lines(v["public_key"], v["signature"], v["timestamp"], str(int(v["timestamp"]) + 10),
                               v["body"]), v["name"])

# ---------------------------------------------------------------- credentials
seen_carriers = set()
for d in fixtures:
    cred = d.get("credential")
    if not cred:
        continue
    doc = json.dumps(cred, separators=(",", ":"))
    add("credentials", doc, d["_name"])
    if d["carrier"] not in seen_carriers:
        seen_carriers.add(d["carrier"])
        add("credentials", json.dumps(doc), d["_name"] + " as string")
for text in [
    '"sk-ant-api03-abcdefghijklmnopqrstuvwxyzABCD"',
    '"sk-proj-abcdefghijklmnopAbCd"',
    '"  gsk_0123456789abcdef  "',
    '"rzp_test_0123456789"',
    '"short"',
    '{"api_key":"sk-ant-x","public_key":"A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="}',
    '{"account_sid":"AC0123456789abcdef0123456789abcdef","auth_token":" tok "}',
    '{"api_key":"k","api_token":"t","account_sid":"acme1","subdomain":null}',
    '{"auth_id":"MA-1_x","auth_token":"\\u00e9t\\u00e9"}',
]:
    add("credentials", text, "hand")

# ---------------------------------------------------------------- settings
for d in fixtures:
    env = d.get("env")
    if env:
        add("settings", "".join(f"{k}={v}\n" for k, v in sorted(env.items())), d["_name"])
full_env = {
    "CALLGATE_LISTEN": "[::1]:8443",
    "CALLGATE_PUBLIC_URL": "https://voice.example.com:8443/",
    "CALLGATE_MASTER_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    "CALLGATE_ADMIN_TOKEN": "admin-token-0123456789",
    "CALLGATE_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1,::ffff:10.1.2.3,fd00::/8",
    "EXOTEL_ALLOWED_IPS": "54.251.0.0/16,2406:da18::/32",
    "CALLGATE_LOG": "info,callgate=debug,actix_web[request{method=POST}]=trace",
    "CALLGATE_BODY_LIMIT_BYTES": "1024",
    "CALLGATE_BYOK_RATE_LIMIT_PER_MINUTE": "4294967296",
    "CALLGATE_PROVIDER_TIMEOUT_MS": " 15 ",
    "CALLGATE_ASSISTANT_URL": "http://assistant.internal:9000/decide",
    "CALLGATE_UPSTREAM_URL": "https://upstream.example.com/events",
    "CALLGATE_UPSTREAM_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "CALLGATE_ANSWER_DEADLINE_MS": "14000",
    "CALLGATE_DELIVERY_WORKERS": "256",
    "CALLGATE_PLIVO_API_URL": "http://127.0.0.1:9999",
    "CALLGATE_EXOTEL_API_URL": "https://api.in.exotel.com",
}
add("settings", "".join(f"{k}={v}\n" for k, v in full_env.items()), "hand: every kind of variable")
rest_env = {
    "CALLGATE_DATA_DIR": "/var/lib/callgate",
    "CALLGATE_CREDENTIAL_GRACE_SECS": "86400",
    "CALLGATE_REPLAY_WINDOW_SECS": "86400",
    "CALLGATE_DELIVERY_HORIZON_SECS": "86400",
    "CALLGATE_DELIVERY_TIMEOUT_MS": "10000",
    "CALLGATE_UPSTREAM_PREVIOUS_SECRET": "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYX",
    "CALLGATE_VOBIZ_API_URL": "https://api.vobiz.ai",
    "CALLGATE_TWILIO_API_URL": "https://api.twilio.com:443",
    "CALLGATE_TELNYX_API_URL": "http://[::1]:8081",
}
add("settings", "".join(f"{k}={v}\n" for k, v in rest_env.items()), "hand: the remaining variables")
add("settings", "CALLGATE_LOG=warn,[span{user=/a+b*/}]=debug\nCALLGATE_LISTEN=0.0.0.0:0\n", "hand: log filter")
add("settings", "CALLGATE_PUBLIC_URL=https://u:p@h.example\n", "hand: bad origin")
add("settings", "CALLGATE_TRUSTED_PROXIES=10.0.0.0/8\n\0"
                'listen = "127.0.0.1:9090"\npublic_url = "https://gw.example.com"\n'
                'trusted_proxies = ["127.0.0.1/32"]\nexotel_allowed_ips = ["203.0.113.0/24"]\n'
                '[handoff]\ndelivery_workers = 4\n[carriers]\nexotel_api_url = "https://api.exotel.com"\n',
    "hand: with TOML")
add("settings", "\0[handoff]\nunknown = 1\n", "hand: TOML with an unknown key")
# Minimized findings of this target (see fuzz/README.md), kept as regression seeds.
add("settings", "CALLGATE_LOG=warn,[span{user=<*................}]=debug\n", "finding: regex DFA blow-up")
add("settings", "CALLGATE_LOG= \u00e9=debug\n", "finding: tracing-subscriber char-boundary panic")
add("settings", "CALLGATE_LOG=[{a=x}],[{a=x}]\n", "finding: tracing-subscriber debug assertion on equal field filters")
add("settings", "CALLGATE_REPLAY_WINDOW_SECS=18446744073709551615\n", "finding: window overflowing now + window in i64 ms")

# ---------------------------------------------------------------- client_ip
for d in fixtures:
    h, env = d["headers"], d.get("env") or {}
    fwd = [(k, v) for k, v in h.items() if k.startswith("x-forwarded-")]
    if not fwd and not env:
        continue
    proxies = ",".join(x for x in (env.get("CALLGATE_TRUSTED_PROXIES"), env.get("EXOTEL_ALLOWED_IPS")) if x)
    add("client_ip", lines("127.0.0.1", proxies, d["public_url"], d["path"], *[f"{k}: {v}" for k, v in fwd]),
        d["_name"])
for text in [
    lines("10.0.0.2", "10.0.0.0/8", "https://gw.example.com", "/exotel/status/ph_1?token=fuzz-token&a=1",
          "x-forwarded-for: 1.1.1.1, 198.51.100.7, 10.0.0.5", "x-forwarded-for: 203.0.113.9:4711",
          "x-forwarded-host: voice.example.net, other", "x-forwarded-proto: http"),
    lines("::ffff:10.0.0.2", "10.0.0.0/8,2001:db8::/32", "http://127.0.0.1:8080", "/p?token=fuzz%2Dtoken",
          "x-forwarded-for: [2001:db8::1]:443, garbage, 2001:db8::2", "x-forwarded-host: [2001:db8::1]:8443"),
    lines("203.0.113.9", "", "https://gw.example.com", "/twilio/voice/ph_1",
          "x-forwarded-for: 198.51.100.1", "x-forwarded-host: evil.example"),
]:
    add("client_ip", text, "hand")

# ---------------------------------------------------------------- write
for target, items in seeds.items():
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    keep = set()
    for data in items:
        name = hashlib.sha1(data).hexdigest()
        keep.add(name)
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    for stale in set(os.listdir(d)) - keep:
        os.remove(os.path.join(d, stale))
    print(f"{target}: {len(items)} seeds, {sum(len(x) for x in items)} bytes")
