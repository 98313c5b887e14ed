//! Types that cross module boundaries, parsed once at the edge.

pub mod credentials;
pub mod e164;
pub mod ids;
pub mod provider;
pub mod secret;
pub mod text;

pub use credentials::PhoneCredential;
pub use e164::E164;
pub use ids::{ApiKeyId, AuditId, EventId, OrgId, PhoneId, SecretId};
pub use provider::Carrier;
pub use secret::{Secret, WipedJson};
