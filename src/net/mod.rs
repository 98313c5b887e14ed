//! What a request looked like from outside: the client's address behind trusted proxies, the
//! URL the carrier signed, bodies read under a limit, the file descriptors connections may
//! take, and where the gateway's own requests may go.

pub mod body;
pub mod client;
pub mod fds;
pub mod form;
pub mod outbound;
pub mod strict_json;
