//! Where the gateway's own requests may go. Organizations name the upstream and the assistant
//! of their numbers by URL, and those requests leave from the gateway's network position: not
//! to link-local addresses (cloud metadata services answer there) and the few metadata
//! addresses outside that range, unspecified or broadcast ones, nor to any of these written as
//! IPv6; nor, for the organizations' URLs, to the ranges the operator denies them. A literal
//! address is refused when the URL is set; a host name is checked each time it is resolved,
//! since it can resolve to anything.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// AWS's instance metadata service over IPv6, which is not link-local.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Cloud services for instances that answer outside the link-local range: Alibaba Cloud's
/// metadata, Oracle Cloud's older metadata address, and Azure's host endpoint (WireServer).
const METADATA_V4: [Ipv4Addr; 3] =
    [Ipv4Addr::new(100, 100, 100, 200), Ipv4Addr::new(192, 0, 0, 192), Ipv4Addr::new(168, 63, 129, 16)];

/// NAT64's well-known prefix (64:ff9b::/96): a NAT64 gateway sends such an address on to the
/// IPv4 address in its last 32 bits.
const NAT64: [u16; 6] = [0x64, 0xff9b, 0, 0, 0, 0];
/// SIIT's IPv4-translated addresses (::ffff:0:a.b.c.d), the IPv4 address in the last 32 bits.
const TRANSLATED: [u16; 6] = [0, 0, 0, 0, 0xffff, 0];

/// Whether the gateway's own requests may not go to `ip`.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast() || METADATA_V4.contains(&v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => forbidden(IpAddr::V4(v4)),
            None => v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == AWS_METADATA_V6,
        },
    }
}

/// The IPv4 address an IPv6 one leads to: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d, which
/// systems still route as IPv4), translated (SIIT), behind NAT64, or through 6to4. `::` and `::1` are IPv6's own.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if v6.is_unspecified() || v6.is_loopback() {
        return None;
    }
    let (s, o) = (v6.segments(), v6.octets());
    if s[..6] == NAT64 || s[..6] == TRANSLATED {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    // NAT64's local-use prefix 64:ff9b:1::/48, the IPv4 address around the reserved octet 8
    // (RFC 6052's /48 layout).
    if s[..3] == [0x64, 0xff9b, 1] {
        return Some(Ipv4Addr::new(o[6], o[7], o[9], o[10]));
    }
    // 6to4 (2002::/16), the IPv4 address in bits 16 to 48.
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    v6.to_ipv4()
}

/// Whether `s` is an absolute URL of one of `schemes` with a host, written as it will be read.
/// For the web's schemes the URL parser forgives what other readers do not (`wss:///ws` is host
/// `ws` to it, and a backslash is a slash), and the text is passed on as given, to a carrier
/// among others: such text is refused, not read one way here and another there.
pub fn well_formed(s: &str, schemes: &[&str]) -> bool {
    let plain = s.split_once("://").is_some_and(|(_, rest)| !rest.starts_with('/')) && !s.contains('\\');
    plain && url::Url::parse(s).is_ok_and(|u| schemes.contains(&u.scheme()) && u.host_str().is_some())
}

/// The body of an answer to one of the gateway's own requests, or `None` once it runs past
/// `most` bytes (or announces more): read a chunk at a time and given up on there, since who
/// answers is not the gateway's to trust, and a body taken whole before its size is looked at
/// could hold the gateway's memory.
pub async fn body_within(mut res: reqwest::Response, most: usize) -> reqwest::Result<Option<Vec<u8>>> {
    if res.content_length().is_some_and(|n| n > most as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await? {
        if body.len() + chunk.len() > most {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Whether the gateway may call `url`: false for a literal address it may not use (a URL
/// stored before that address was refused). Host names are checked when resolved.
pub fn allowed_url(url: &str) -> bool {
    OPERATOR.allows_url(url)
}

/// Whether two URLs are one as the URL parser reads them (the case of scheme and host, a
/// default port, an empty path): a number naming the operator's own URL in another spelling
/// names that URL.
pub fn same_url(a: &str, b: &str) -> bool {
    a == b || matches!((url::Url::parse(a), url::Url::parse(b)), (Ok(x), Ok(y)) if x == y)
}

/// Where a URL may lead: never to a [`forbidden`] address, nor into `deny`. An organization's
/// own URLs (a number's upstream and assistant) are held to the operator's
/// `CALLGATE_ORG_URL_DENY`: the networks the gateway sits in (its platform's internal
/// services), which the gateway can reach and its tenants should not reach through it. The
/// operator's own URLs are held to nothing more than `forbidden`.
///
/// The egress proxies (`proxies`, by name) are in those networks, and the client reaches them
/// through the same resolver, so their names resolve whatever `deny` says; an organization's
/// URL may then not name them itself, which would reach the proxy's host directly.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reach {
    deny: Vec<IpNet>,
    proxies: Vec<String>,
}

impl Reach {
    /// An entry written as IPv4-mapped IPv6 (`::ffff:10.0.0.0/104`) is taken as the IPv4 range
    /// it maps: addresses are matched in their IPv4 form, so as written it would match nothing.
    pub fn denying(deny: Vec<IpNet>, proxies: Vec<String>) -> Self {
        let deny = deny
            .into_iter()
            .map(|net| match net {
                IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
                    Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
                    None => net,
                },
                other => other,
            })
            .collect();
        Self { deny, proxies }
    }

    /// Whether nothing beyond `forbidden` is refused.
    pub fn is_open(&self) -> bool {
        self.deny.is_empty()
    }

    /// Whether a request may not go to `ip`. An IPv6 address that leads to an IPv4 one is
    /// refused if that one is.
    pub fn refuses(&self, ip: IpAddr) -> bool {
        let v4 = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        forbidden(ip) || self.deny.iter().any(|n| n.contains(&ip) || v4.is_some_and(|v4| n.contains(&v4)))
    }

    /// Whether `url` may be called: false for a literal address it refuses, or a proxy's name
    /// while anything is denied. Other host names are checked when resolved (`AllowedOnly`).
    pub fn allows_url(&self, url: &str) -> bool {
        match url::Url::parse(url).ok().and_then(|u| u.host().map(|h| h.to_owned())) {
            Some(url::Host::Ipv4(v4)) => !self.refuses(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => !self.refuses(IpAddr::V6(v6)),
            Some(url::Host::Domain(d)) => self.is_open() || !self.is_proxy(&d),
            None => true,
        }
    }

    fn is_proxy(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.');
        self.proxies.iter().any(|p| p.eq_ignore_ascii_case(name))
    }
}

/// The operator's own URLs' reach: nothing beyond `forbidden`.
pub static OPERATOR: Reach = Reach { deny: Vec::new(), proxies: Vec::new() };

/// Resolves host names for a client of the hand-off, leaving out the addresses its reach
/// refuses; a name with none left fails to resolve. The egress proxies' names are held only to
/// what nobody may reach (see [`Reach`]).
pub struct AllowedOnly(pub Arc<Reach>);

/// The host names of the egress proxies reqwest takes from the environment (`var`), as the
/// resolver is asked for them: lowercase, without a trailing dot.
pub fn proxy_hosts(var: impl Fn(&str) -> Option<String>) -> Vec<String> {
    ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .into_iter()
        .filter_map(|name| var(name).filter(|v| !v.trim().is_empty()))
        .filter_map(|v| {
            let v = v.trim();
            // reqwest takes `host:port` as an http proxy.
            let url = if v.contains("://") { url::Url::parse(v) } else { url::Url::parse(&format!("http://{v}")) };
            match url.ok()?.host()? {
                // A scheme the URL parser does not know (socks5) leaves an address as text.
                url::Host::Domain(d) if d.parse::<IpAddr>().is_err() => {
                    Some(d.trim_end_matches('.').to_ascii_lowercase())
                }
                _ => None,
            }
        })
        .collect()
}

impl reqwest::dns::Resolve for AllowedOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let proxy = self.0.is_proxy(&host);
        let reach = Arc::clone(&self.0);
        Box::pin(async move {
            let refused = |ip: IpAddr| if proxy { forbidden(ip) } else { reach.refuses(ip) };
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.filter(|a| !refused(a.ip())).collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no address the gateway may call").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use reqwest::dns::{Name, Resolve};

    use super::*;

    #[test]
    fn metadata_link_local_unspecified_and_broadcast_addresses_are_forbidden() {
        for bad in [
            "169.254.169.254",
            "0.0.0.0",
            "255.255.255.255",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::169.254.169.254",
            "100.100.100.200",
            "192.0.0.192",
            "168.63.129.16",
            "::ffff:100.100.100.200",
            "64:ff9b::100.100.100.200",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b:1:a9fe:a9:fe00::",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(forbidden(bad.parse().unwrap()), "{bad}");
        }
        for fine in [
            "127.0.0.1",
            "10.0.0.5",
            "203.0.113.7",
            "100.100.100.201",
            "::1",
            "2001:db8::1",
            "fd00:ec2::253",
            "64:ff9b::203.0.113.7",
            "::ffff:10.0.0.5",
            "2002:cb00:7107::1",
            "64:ff9b:1:cb00:71:700::",
        ] {
            assert!(!forbidden(fine.parse().unwrap()), "{fine}");
        }
    }

    #[test]
    fn a_url_is_well_formed_only_as_every_reader_reads_it() {
        for fine in ["wss://agent.example.com/ws", "ws://10.0.0.5:8080/x?y=z", "https://Agent.example.com"] {
            assert!(well_formed(fine, &["wss", "ws", "https"]), "{fine}");
        }
        for bad in
            ["wss:///ws", "wss:////agent.example.com", "wss://agent.example.com\\ws", "wss:ws", "wss://", "https://x"]
        {
            assert!(!well_formed(bad, &["wss", "ws"]), "{bad}");
        }
    }

    #[test]
    fn urls_naming_a_forbidden_address_are_not_called() {
        for bad in ["http://169.254.169.254/latest", "http://[fd00:ec2::254]/", "https://[::ffff:a9fe:a9fe]:8443/x"] {
            assert!(!allowed_url(bad), "{bad}");
        }
        for fine in ["http://127.0.0.1:9/hook", "https://agent.example.com/hook", "http://[::1]/"] {
            assert!(allowed_url(fine), "{fine}");
        }
    }

    #[tokio::test]
    async fn a_name_that_resolves_only_to_forbidden_addresses_does_not_resolve() {
        let resolve = |n: &str| AllowedOnly(Arc::new(OPERATOR.clone())).resolve(Name::from_str(n).unwrap());
        // Numeric names go through the system resolver as any name does.
        for bad in ["169.254.169.254", "0"] {
            let err = resolve(bad).await.err().unwrap_or_else(|| panic!("{bad} resolved"));
            assert!(err.to_string().contains("no address the gateway may call"), "{bad}: {err}");
        }
        let ok: Vec<SocketAddr> = resolve("127.0.0.1").await.unwrap().collect();
        assert_eq!(ok, ["127.0.0.1:0".parse::<SocketAddr>().unwrap()]);
    }
    fn internal_behind(proxies: &[&str]) -> Reach {
        let nets = ["10.0.0.0/8", "127.0.0.0/8", "::1/128", "fc00::/7"];
        let proxies = proxies.iter().map(|p| p.to_string()).collect();
        Reach::denying(nets.iter().map(|n| n.parse().unwrap()).collect(), proxies)
    }

    fn internal() -> Reach {
        internal_behind(&[])
    }

    #[test]
    fn an_organizations_urls_may_not_reach_the_ranges_the_operator_denies() {
        let reach = internal();
        for bad in [
            "http://10.1.2.3/hook",
            "http://127.0.0.1:9/hook",
            "http://[::1]/",
            "http://[fd12::1]/",
            // The same addresses written otherwise: as the URL parser reads them, and as IPv6
            // that leads to IPv4.
            "http://2130706433/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://127.0.0.1./",
            "http://ok@127.0.0.1:8080/",
            "http://[::ffff:10.1.2.3]/",
            "http://[64:ff9b::7f00:1]/",
            "http://[::127.0.0.1]/",
            "http://[2002:7f00:1::]/",
            "http://[64:ff9b:1:7f00:0:100::]/",
            // And what nobody may reach, as before.
            "http://169.254.169.254/latest",
        ] {
            assert!(!reach.allows_url(bad), "{bad}");
        }
        for fine in ["http://11.0.0.1/hook", "https://agent.example.com/hook", "http://[2001:db8::1]/"] {
            assert!(reach.allows_url(fine), "{fine}");
        }
        // The operator's own URLs: only what nobody may reach.
        assert!(OPERATOR.allows_url("http://10.1.2.3/hook"));
        assert!(OPERATOR.is_open() && !reach.is_open());
    }

    #[tokio::test]
    async fn a_name_that_resolves_only_into_denied_ranges_does_not_resolve_for_an_organization() {
        let localhost = || Name::from_str("localhost").unwrap();
        let err = AllowedOnly(Arc::new(internal())).resolve(localhost()).await.err().expect("refused");
        assert!(err.to_string().contains("no address the gateway may call"), "{err}");
        let ok: Vec<SocketAddr> = AllowedOnly(Arc::new(OPERATOR.clone())).resolve(localhost()).await.unwrap().collect();
        assert!(ok.iter().any(|a| a.ip().is_loopback()), "{ok:?}");
        // The egress proxy, in the denied network, is still reached; an organization's URL
        // may not name it.
        let proxied = AllowedOnly(Arc::new(internal_behind(&["LocalHost"])));
        let ok: Vec<SocketAddr> = proxied.resolve(localhost()).await.unwrap().collect();
        assert!(ok.iter().any(|a| a.ip().is_loopback()), "{ok:?}");
        let err = proxied.resolve(Name::from_str("127.0.0.1").unwrap()).await.err().expect("not the proxy");
        assert!(err.to_string().contains("no address the gateway may call"), "{err}");
        assert!(!proxied.0.allows_url("http://localhost.:8080/admin"));
        assert!(internal().allows_url("http://localhost:8080/admin"), "checked when resolved");
        assert!(Reach::denying(vec![], vec!["localhost".into()]).allows_url("http://localhost/"), "nothing denied");
    }

    #[test]
    fn the_egress_proxies_names_are_read_as_reqwest_reads_them() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        };
        let hosts = proxy_hosts(env(&[("HTTPS_PROXY", "http://Egress.Internal.:3128"), ("http_proxy", "squid:3128")]));
        assert_eq!(hosts, ["egress.internal", "squid"]);
        // Literal addresses are not resolved, and nothing set is nothing.
        assert!(proxy_hosts(env(&[("ALL_PROXY", "socks5://10.0.0.9:1080"), ("HTTP_PROXY", " ")])).is_empty());
    }

    #[test]
    fn the_same_url_in_another_spelling_is_the_same() {
        assert!(same_url("http://10.0.0.5:8080/hook", "HTTP://10.0.0.5:8080/hook"));
        assert!(same_url("http://Up.Example:80", "http://up.example/"));
        assert!(!same_url("http://up.example/hook", "http://up.example/hook2"));
        assert!(!same_url("http://up.example/hook", "https://up.example/hook"));
        assert!(!same_url("not a url", "http://up.example/"));
    }

    #[test]
    fn a_denied_range_written_as_mapped_ipv6_is_its_ipv4_range() {
        let reach = Reach::denying(vec!["::ffff:10.0.0.0/104".parse().unwrap(), "fd00::/8".parse().unwrap()], vec![]);
        assert_eq!(reach, Reach::denying(vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()], vec![]));
        assert!(!reach.allows_url("http://10.1.2.3/") && !reach.allows_url("http://[::ffff:10.1.2.3]/"));
        assert!(reach.allows_url("http://11.1.2.3/"));
    }
}
