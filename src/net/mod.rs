//! What a request looked like from outside: the client's address behind trusted proxies, the
//! URL the carrier signed, and bodies read under a limit.

pub mod body;
pub mod client;
pub mod form;
