//! The phone carriers callgate terminates webhooks for.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Carrier {
    Plivo,
    Vobiz,
    Twilio,
    Exotel,
    Telnyx,
}

impl Carrier {
    pub const ALL: [Carrier; 5] = [Carrier::Vobiz, Carrier::Twilio, Carrier::Plivo, Carrier::Exotel, Carrier::Telnyx];

    pub fn as_str(self) -> &'static str {
        match self {
            Carrier::Plivo => "plivo",
            Carrier::Vobiz => "vobiz",
            Carrier::Twilio => "twilio",
            Carrier::Exotel => "exotel",
            Carrier::Telnyx => "telnyx",
        }
    }
}

impl fmt::Display for Carrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown carrier (accepted: vobiz, twilio, plivo, exotel, telnyx)")]
pub struct UnknownCarrier;

impl FromStr for Carrier {
    type Err = UnknownCarrier;
    fn from_str(s: &str) -> Result<Self, UnknownCarrier> {
        Carrier::ALL.into_iter().find(|c| c.as_str() == s).ok_or(UnknownCarrier)
    }
}
