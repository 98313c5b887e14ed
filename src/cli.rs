//! Command line: `serve`, the operator commands that work on a stopped server's data dir, and
//! the fixture tools.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "callgate", version, about = "Carrier webhook gateway for BYOK voice-AI platforms")]
pub struct Cli {
    /// Settings file layered over config/default.toml (environment variables still win).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Organizations (server stopped).
    Org {
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// Master key management (server stopped).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Check the data dir (server stopped): every record has its indexes, every event its
    /// delivery record. Exits non-zero if anything is wrong.
    Check,
    /// Rewrite a damaged event journal (server stopped) from every record that still reads
    /// back, when start-up refuses it. The damaged journal is kept beside the new one.
    Salvage {
        /// Report what would be kept and lost; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The upstream hand-off (Standard Webhooks signing).
    Upstream {
        #[command(subcommand)]
        command: UpstreamCommand,
    },
    /// Signed webhook fixtures: make one for your own number.
    Fixtures {
        #[command(subcommand)]
        command: FixturesCommand,
    },
    /// Send signed webhook fixtures to a running callgate and check its answers.
    ///
    /// A running deployment keeps its own clock, settings and phone numbers; replay cannot pin
    /// or create them. It expects every fixture's phone to exist there with the fixture's id
    /// (`phone.id`, as `GET /phone-numbers` shows it) and credential, the deployment's
    /// CALLGATE_PUBLIC_URL to be the fixture's `public_url`, and (Exotel) this machine's
    /// address to be allowed; a fixture's `now`, `env` and `phone` are not applied. It is meant
    /// for fixtures an operator signed with `callgate fixtures sign` for their own numbers; the
    /// repository's fixtures/ are replayed by the test suite, which pins the clock and creates
    /// the phones. Telnyx signatures expire after 300 s: use --fresh-timestamps for fixtures
    /// that carry their `signing_seed`. A signed request can be accepted once; sending it
    /// again is a replay (acknowledged, not recorded). Status, error code and answer text are
    /// checked, not the recorded events. Prints `PASS name` or `FAIL name expected X got Y`
    /// per fixture and exits non-zero if any failed; if nothing answers at the target, it
    /// stops at the first fixture and says so.
    Replay(ReplayArgs),
}

#[derive(Subcommand, Debug)]
pub enum FixturesCommand {
    /// Sign a webhook request with a credential, as the carrier would, and print the fixture
    /// JSON (expecting 200 and one recorded event; edit `expect` for other cases).
    Sign(Box<SignArgs>),
}

#[derive(clap::Args, Debug)]
pub struct SignArgs {
    /// plivo, vobiz, twilio, exotel or telnyx.
    #[arg(long)]
    pub carrier: String,
    /// The phone's credential as JSON, in the shape POST /byok takes.
    #[arg(long, value_name = "FILE.json")]
    pub credential: std::path::PathBuf,
    /// GET or POST.
    #[arg(long, value_name = "M")]
    pub method: String,
    /// The full public URL the carrier calls, query included, e.g.
    /// https://gw.example.com/plivo/incoming/ph_… or https://gw.example.com/webhooks/telnyx/voice.
    #[arg(long)]
    pub url: String,
    /// The raw body.
    #[arg(long, value_name = "STR", conflicts_with = "body_file")]
    pub body: Option<String>,
    /// The raw body, read from a file byte for byte.
    #[arg(long, value_name = "F")]
    pub body_file: Option<std::path::PathBuf>,
    /// Default: form-encoded for a POST body, JSON for Telnyx or a body starting with `{`.
    #[arg(long, value_name = "CT")]
    pub content_type: Option<String>,
    /// Plivo/Vobiz nonce; random 20 digits when omitted.
    #[arg(long, value_name = "N")]
    pub nonce: Option<String>,
    /// Telnyx timestamp, Unix seconds; now when omitted.
    #[arg(long, value_name = "T")]
    pub timestamp: Option<i64>,
    /// Telnyx: hex of the 32-byte Ed25519 seed whose public key is the credential's public_key.
    #[arg(long, value_name = "HEX")]
    pub seed: Option<String>,
    /// Vobiz V3 canonical string: `docs` (URL without query + nonce) or `sdk` (Plivo's rule,
    /// what both Vobiz SDKs compute).
    #[arg(long, value_enum, default_value = "sdk")]
    pub vobiz_form: VobizFormArg,
    /// The phone's E.164 number, when the request does not name it (`To`, Telnyx `to`).
    #[arg(long)]
    pub number: Option<String>,
    /// The fixture's clock, Unix seconds; the Telnyx timestamp or now when omitted.
    #[arg(long, value_name = "T")]
    pub now: Option<i64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum VobizFormArg {
    Docs,
    Sdk,
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// A fixture file or a directory of them (searched recursively; `vectors/` is skipped).
    pub dir: std::path::PathBuf,
    /// The callgate to send them to, e.g. http://127.0.0.1:8080.
    #[arg(long, value_parser = http_target)]
    pub target: String,
    /// Re-sign Telnyx fixtures that carry their `signing_seed` with a timestamp as far from
    /// now as the original was from the fixture's `now`, so they pass the ±300 s window.
    #[arg(long)]
    pub fresh_timestamps: bool,
}

/// A base URL that fixtures' paths can be put after: one mistyped is said once, not once a
/// fixture.
fn http_target(s: &str) -> Result<String, String> {
    let base = url::Url::parse(s).is_ok_and(|u| u.query().is_none() && u.fragment().is_none());
    if !base || !crate::net::outbound::well_formed(s, &["http", "https"]) {
        return Err("must be an http:// or https:// URL with a host and no query, e.g. http://127.0.0.1:8080".into());
    }
    Ok(s.to_owned())
}

#[derive(Subcommand, Debug)]
pub enum OrgCommand {
    /// Create an organization and print its first API key (shown once).
    Create { name: String },
    /// List organizations.
    List,
}

#[derive(Subcommand, Debug)]
pub enum UpstreamCommand {
    /// Print the secret deliveries are signed with (whsec_…), for the platform's verifier:
    /// CALLGATE_UPSTREAM_SECRET if set, else the one in the data dir (generated if absent).
    Secret,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Re-wrap every stored secret under a new master key. With a key file, the new key
    /// replaces it; with CALLGATE_MASTER_KEY, pass the new key and set the variable to it after.
    Rotate {
        /// Base64 of 32 bytes; generated when omitted (key file only). Better given as
        /// CALLGATE_NEW_MASTER_KEY: a command line is visible to every local user (`ps`) and
        /// kept in shell history.
        #[arg(long, value_name = "BASE64", env = "CALLGATE_NEW_MASTER_KEY", hide_env_values = true)]
        new_key: Option<String>,
    },
}
