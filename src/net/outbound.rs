//! Where the gateway's own requests may go. Organizations name the upstream and the assistant
//! of their numbers by URL, and those requests leave from the gateway's network position: not
//! to link-local addresses (cloud metadata services answer there), unspecified or broadcast
//! ones. A literal address is refused when the URL is set; a host name is checked each time
//! it is resolved, since it can resolve to anything.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// AWS's instance metadata service over IPv6, which is not link-local.
const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Whether the gateway's own requests may not go to `ip`.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => forbidden(IpAddr::V4(v4)),
            None => v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == AWS_METADATA_V6,
        },
    }
}

/// Whether the gateway may call `url`: false for a literal address it may not use (a URL
/// stored before that address was refused). Host names are checked when resolved.
pub fn allowed_url(url: &str) -> bool {
    let ip = match url::Url::parse(url).ok().and_then(|u| u.host().map(|h| h.to_owned())) {
        Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        _ => return true,
    };
    !forbidden(ip)
}

/// Resolves host names for the hand-off's client, leaving out the addresses it may not use;
/// a name with none left fails to resolve.
pub struct AllowedOnly;

impl reqwest::dns::Resolve for AllowedOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.filter(|a| !forbidden(a.ip())).collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no address the gateway may call").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use reqwest::dns::{Name, Resolve};

    use super::*;

    #[test]
    fn metadata_link_local_unspecified_and_broadcast_addresses_are_forbidden() {
        for bad in [
            "169.254.169.254",
            "0.0.0.0",
            "255.255.255.255",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            assert!(forbidden(bad.parse().unwrap()), "{bad}");
        }
        for fine in ["127.0.0.1", "10.0.0.5", "203.0.113.7", "::1", "2001:db8::1", "fd00:ec2::253"] {
            assert!(!forbidden(fine.parse().unwrap()), "{fine}");
        }
    }

    #[test]
    fn urls_naming_a_forbidden_address_are_not_called() {
        for bad in ["http://169.254.169.254/latest", "http://[fd00:ec2::254]/", "https://[::ffff:a9fe:a9fe]:8443/x"] {
            assert!(!allowed_url(bad), "{bad}");
        }
        for fine in ["http://127.0.0.1:9/hook", "https://agent.example.com/hook", "http://[::1]/"] {
            assert!(allowed_url(fine), "{fine}");
        }
    }

    #[tokio::test]
    async fn a_name_that_resolves_only_to_forbidden_addresses_does_not_resolve() {
        let resolve = |n: &str| AllowedOnly.resolve(Name::from_str(n).unwrap());
        // Numeric names go through the system resolver as any name does.
        for bad in ["169.254.169.254", "0"] {
            let err = resolve(bad).await.err().unwrap_or_else(|| panic!("{bad} resolved"));
            assert!(err.to_string().contains("no address the gateway may call"), "{bad}: {err}");
        }
        let ok: Vec<SocketAddr> = resolve("127.0.0.1").await.unwrap().collect();
        assert_eq!(ok, ["127.0.0.1:0".parse::<SocketAddr>().unwrap()]);
    }
}
