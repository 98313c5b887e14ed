//! How many items one page of a listing holds: what the caller asked for, within the
//! endpoint's bounds.

/// `asked`, or `default` when not given. More than `max` is served as `max`: the page's
/// cursor leads to the rest. Zero is refused rather than served as one item: a page of none
/// could only be a mistake, and a redelivery of "0" events must not send one.
pub fn limit(asked: Option<usize>, default: usize, max: usize) -> Result<usize, String> {
    match asked {
        None => Ok(default),
        Some(0) => Err(format!("limit: must be at least 1 (at most {max} are taken at once)")),
        Some(n) => Ok(n.min(max)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_when_absent_capped_at_max_and_zero_refused() {
        assert_eq!(limit(None, 50, 500), Ok(50));
        assert_eq!(limit(Some(1), 50, 500), Ok(1));
        assert_eq!(limit(Some(500), 50, 500), Ok(500));
        assert_eq!(limit(Some(501), 50, 500), Ok(500));
        assert_eq!(limit(Some(usize::MAX), 50, 500), Ok(500));
        assert_eq!(
            limit(Some(0), 50, 500),
            Err("limit: must be at least 1 (at most 500 are taken at once)".to_owned())
        );
    }
}
