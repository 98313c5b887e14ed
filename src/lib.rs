//! callgate: verifies carrier webhooks with each number's own credential, records them
//! durably, and hands them to the voice platform.

pub mod auth;
pub mod carriers;
pub mod cli;
pub mod clock;
pub mod commands;
pub mod domain;
pub mod error;
pub mod events;
pub mod fixtures;
pub mod handoff;
pub mod metrics;
pub mod net;
pub mod orgs;
pub mod paging;
pub mod phones;
pub mod private_file;
pub mod rate_limit;
pub mod settings;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod vault;
