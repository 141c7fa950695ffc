//! Who a request is, for rate limiting: the client's address (believing X-Forwarded-For or
//! Forwarded only from trusted proxies), a request header, or a query parameter.

use http::{HeaderMap, HeaderName, Uri, header};
use ipnet::IpNet;
use std::net::IpAddr;

/// One part of a rate-limit key (`per = "client_ip" | "header:NAME" | "query:NAME"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyPart {
    /// The client's address.
    ClientIp,
    /// A request header's value.
    Header(HeaderName),
    /// A query parameter's value.
    Query(String),
}

impl std::fmt::Display for KeyPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyPart::ClientIp => f.write_str("client_ip"),
            KeyPart::Header(h) => write!(f, "header:{h}"),
            KeyPart::Query(q) => write!(f, "query:{q}"),
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn trusted(ip: IpAddr, nets: &[IpNet]) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// Parses one node of X-Forwarded-For or a Forwarded `for=`: `1.2.3.4`, `1.2.3.4:80`,
/// `2001:db8::1`, `[2001:db8::1]:80`, optionally quoted.
fn parse_node(raw: &str) -> Option<IpAddr> {
    let s = raw.trim().trim_matches('"');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, _) = rest.split_once(']')?;
        return addr.parse().ok().map(canonical);
    }
    let (addr, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn forwarded_for(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').filter_map(|element| {
        element.split(';').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            k.trim().eq_ignore_ascii_case("for").then_some(v)
        })
    })
}

/// The client's address: the socket peer, unless the peer is a trusted proxy, in which case
/// the right-most address in X-Forwarded-For (or else Forwarded) that is not itself trusted.
/// A malformed entry stops the walk at the last good hop, so a client cannot use garbage to
/// pick its own identity.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !trusted(peer, trusted_proxies) {
        return peer;
    }
    let xff: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let nodes: Vec<&str> = if xff.is_empty() {
        headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(forwarded_for)
            .collect()
    } else {
        xff
    };
    let mut client = peer;
    for node in nodes.iter().rev() {
        match parse_node(node) {
            Some(ip) => {
                client = ip;
                if !trusted(ip, trusted_proxies) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

/// Appends the value of one key part to `out` (an address as its raw octets); `false` if the
/// request does not have it.
pub fn append_part(
    part: &KeyPart,
    client: IpAddr,
    headers: &HeaderMap,
    uri: &Uri,
    out: &mut Vec<u8>,
) -> bool {
    match part {
        KeyPart::ClientIp => {
            match client {
                IpAddr::V4(a) => {
                    out.push(b'4');
                    out.extend_from_slice(&a.octets());
                }
                IpAddr::V6(a) => {
                    out.push(b'6');
                    out.extend_from_slice(&a.octets());
                }
            }
            true
        }
        KeyPart::Header(name) => {
            let mut any = false;
            for v in headers.get_all(name) {
                if v.is_empty() {
                    continue;
                }
                if any {
                    out.push(b',');
                }
                out.extend_from_slice(v.as_bytes());
                any = true;
            }
            any
        }
        KeyPart::Query(name) => {
            let found = uri.query().and_then(|q| {
                q.split('&').find_map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (k == name && !v.is_empty()).then_some(v)
                })
            });
            match found {
                Some(v) => {
                    out.extend_from_slice(v.as_bytes());
                    true
                }
                None => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    fn nets() -> Vec<IpNet> {
        vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ]
    }

    #[test]
    fn untrusted_peer_cannot_forge() {
        let ip = client_ip(
            "192.0.2.9".parse().unwrap(),
            &h(&[("x-forwarded-for", "1.1.1.1")]),
            &nets(),
        );
        assert_eq!(ip, "192.0.2.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rightmost_untrusted_from_trusted_peer() {
        let headers = h(&[
            ("x-forwarded-for", "6.6.6.6, 203.0.113.5"),
            ("x-forwarded-for", "10.1.1.1"),
        ]);
        let ip = client_ip("127.0.0.1".parse().unwrap(), &headers, &nets());
        assert_eq!(ip, "203.0.113.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_header_and_malformed_entries() {
        let headers = h(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=https",
        )]);
        let ip = client_ip("10.0.0.1".parse().unwrap(), &headers, &nets());
        assert_eq!(ip, "2001:db8::1".parse::<IpAddr>().unwrap());
        let headers = h(&[("forwarded", "for=garbage")]);
        assert_eq!(
            client_ip("10.0.0.1".parse().unwrap(), &headers, &nets()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        let headers = h(&[("x-forwarded-for", "1.2.3.4, not-an-ip, 10.0.0.7")]);
        assert_eq!(
            client_ip("10.0.0.1".parse().unwrap(), &headers, &nets()),
            "10.0.0.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn key_parts() {
        let headers = h(&[("x-api-key", "k1")]);
        let uri: Uri = "/a?x=1&key=abc".parse().unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut out = Vec::new();
        assert!(append_part(
            &KeyPart::Header(HeaderName::from_static("x-api-key")),
            ip,
            &headers,
            &uri,
            &mut out
        ));
        assert!(append_part(
            &KeyPart::Query("key".into()),
            ip,
            &headers,
            &uri,
            &mut out
        ));
        assert!(!append_part(
            &KeyPart::Query("nope".into()),
            ip,
            &headers,
            &uri,
            &mut out
        ));
        assert!(append_part(
            &KeyPart::ClientIp,
            ip,
            &headers,
            &uri,
            &mut out
        ));
        assert_eq!(out, b"k1abc4\xc0\x00\x02\x01");
    }
}
