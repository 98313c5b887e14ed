//! Names and labels that people read in lists and logs.

/// Whether `s` is at most `max` characters a person can see for what they are: no control
/// characters, and none of the invisible formatting ones (bidirectional overrides and
/// isolates, zero-width characters, the byte-order mark), with which a name can show as
/// another or reorder the text around it.
pub fn displayable(s: &str, max: usize) -> bool {
    s.chars().count() <= max && !s.chars().any(|c| c.is_control() || invisible(c))
}

/// `s` with its control and invisible formatting characters left out, cut to `max` characters:
/// for names that come from elsewhere (a carrier's listing) and are shown as they are.
pub fn shown(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control() && !invisible(*c)).take(max).collect()
}

pub(crate) fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

#[cfg(test)]
mod tests {
    use super::displayable;

    #[test]
    fn control_and_invisible_formatting_characters_are_refused() {
        assert!(displayable("Acme Voice — São Paulo 東京", 200));
        assert!(displayable("", 200));
        for bad in ["a\nb", "a\u{0}b", "evil\u{202E}gpj.exe", "ad\u{200B}min", "\u{FEFF}Acme", "a\u{2066}b"] {
            assert!(!displayable(bad, 200), "{bad:?}");
        }
        assert!(displayable(&"é".repeat(200), 200));
        assert!(!displayable(&"é".repeat(201), 200), "characters are counted, not bytes");
    }

    #[test]
    fn names_from_elsewhere_are_shown_without_what_cannot_be_seen() {
        assert_eq!(super::shown("\u{202E}\u{0}evil\tname\u{200B}", 200), "evilname");
        assert_eq!(super::shown("Main line 東京", 200), "Main line 東京");
        assert_eq!(super::shown(&"é".repeat(300), 200), "é".repeat(200));
    }
}
