//! One integration-test binary: every test starts the real server and talks HTTP to it.

mod byok;
mod carrier_rest;
mod cli;
mod crash;
mod fake_carrier;
mod handoff;
mod hardening;
mod helpers;
mod orgs;
mod phones;
mod secrets;
mod webhooks;
