//! One integration-test binary: every test starts the real server and talks HTTP to it.

mod byok;
mod helpers;
mod orgs;
