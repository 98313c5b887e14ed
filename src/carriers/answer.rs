//! What to tell the carrier about an incoming call, before it is rendered in its format.

use actix_web::HttpResponse;
use serde::{Deserialize, Serialize};

use crate::store::PhoneRecord;

pub const APOLOGY: &str = "Sorry, we cannot take your call right now. Please try again later. Goodbye.";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Decision {
    Stream { stream_url: String },
    Hangup { message: Option<String> },
    Transfer { to: String },
}

impl Decision {
    /// Without an assistant: the number's own stream, else a polite goodbye.
    pub fn fallback(phone: &PhoneRecord) -> Decision {
        match &phone.config.stream_url {
            Some(url) => Decision::Stream { stream_url: url.clone() },
            None => Decision::Hangup { message: Some(APOLOGY.to_owned()) },
        }
    }
}

/// Escapes text and attribute values for the carriers' XML documents.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

pub fn xml(content_type: &'static str, doc: String) -> HttpResponse {
    HttpResponse::Ok().content_type(content_type).body(doc)
}

/// Plivo and Vobiz share PlivoXML.
pub fn plivo_xml(decision: &Decision) -> String {
    let inner = match decision {
        Decision::Stream { stream_url } => format!(
            "<Stream bidirectional=\"true\" keepCallAlive=\"true\" contentType=\"audio/x-mulaw;rate=8000\">{}</Stream>",
            xml_escape(stream_url)
        ),
        Decision::Hangup { message } => {
            format!("<Speak>{}</Speak><Hangup/>", xml_escape(message.as_deref().unwrap_or(APOLOGY)))
        }
        Decision::Transfer { to } => format!("<Dial><Number>{}</Number></Dial>", xml_escape(to)),
    };
    format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response>{inner}</Response>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plivo_documents() {
        let s = plivo_xml(&Decision::Stream { stream_url: "wss://a.example/s?x=1&y=2".into() });
        assert_eq!(
            s,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Stream bidirectional=\"true\" keepCallAlive=\"true\" contentType=\"audio/x-mulaw;rate=8000\">wss://a.example/s?x=1&amp;y=2</Stream></Response>"
        );
        let h = plivo_xml(&Decision::Hangup { message: Some("<bye>".into()) });
        assert!(h.contains("<Speak>&lt;bye&gt;</Speak><Hangup/>"));
    }
}
