//! Command line: `serve`, and the operator commands that work on a stopped server's data dir.

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
}

#[derive(Subcommand, Debug)]
pub enum OrgCommand {
    /// Create an organization and print its first API key (shown once).
    Create { name: String },
    /// List organizations.
    List,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Re-wrap every stored secret under a new master key. With a key file, the new key
    /// replaces it; with CALLGATE_MASTER_KEY, pass the new key and set the variable to it after.
    Rotate {
        /// Base64 of 32 bytes; generated when omitted (key file only).
        #[arg(long, value_name = "BASE64")]
        new_key: Option<String>,
    },
}
