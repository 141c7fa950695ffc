//! Header rules of a proxy: hop-by-hop headers removed both ways, forwarding headers
//! (X-Forwarded-*, Forwarded, Via) set, and extended from a client's values only when the peer is
//! a trusted proxy.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use std::fmt::Write;
use std::net::IpAddr;

/// `Via` value added to requests and responses.
pub const VIA_H1: HeaderValue = HeaderValue::from_static("1.1 palisade");
/// `Via` value for requests that arrived over HTTP/2.
pub const VIA_H2: HeaderValue = HeaderValue::from_static("2 palisade");

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A header value made of `parts` in one exactly sized allocation that becomes the value
/// itself (no second copy): for the values written on every request.
pub fn value_of(parts: &[&[u8]]) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        v.extend_from_slice(p);
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v))
}

/// Removes hop-by-hop headers: Connection and the headers it names, Keep-Alive, TE, Trailer,
/// Transfer-Encoding, Upgrade and every Proxy-* header.
pub fn remove_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none: one pass over the names (no hashing) settles that.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
        h.remove(header::CONNECTION);
    }
    for n in [
        &KEEP_ALIVE,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        if h.contains_key(n) {
            h.remove(n);
        }
    }
    if h.keys().any(|k| k.as_str().starts_with("proxy-")) {
        let proxy: Vec<HeaderName> = h
            .keys()
            .filter(|k| k.as_str().starts_with("proxy-"))
            .cloned()
            .collect();
        for n in proxy {
            h.remove(n);
        }
    }
}

/// Whether `name` is hop-by-hop by itself (not counting the names a Connection header lists).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name.as_str().starts_with("proxy-")
}

/// Whether `ip` is one of the trusted proxies.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    trusted.iter().any(|n| n.contains(&ip))
}

fn push_forwarded_node(out: &mut String, ip: IpAddr) {
    let _ = match ip {
        IpAddr::V4(v4) => write!(out, "{v4}"),
        IpAddr::V6(v6) => write!(out, "\"[{v6}]\""),
    };
}

fn push_forwarded_value(out: &mut String, s: &str) {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    {
        out.push_str(s);
    } else {
        out.push('"');
        for c in s.chars() {
            if c == '\\' || c == '"' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
}

/// `prior` and ", " if there is a prior value, else an empty buffer.
fn extend(prior: Option<String>) -> String {
    match prior {
        Some(mut p) => {
            p.push_str(", ");
            p
        }
        None => String::with_capacity(64),
    }
}

/// A client address as the forwarding headers write it (IPv4-mapped IPv6 as IPv4), formatted
/// once per connection rather than once per request.
pub struct Peer {
    xff: HeaderValue,
    node: Box<str>,
    /// The last `Forwarded` value made from this peer's address alone, with the host and
    /// protocol it names: a keep-alive client sends the same Host request after request.
    last: std::sync::Mutex<Option<(Box<str>, &'static str, HeaderValue)>>,
}

impl Peer {
    /// The forms of `ip`.
    pub fn new(ip: IpAddr) -> Peer {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let text = ip.to_string();
        let mut node = String::with_capacity(text.len() + 4);
        push_forwarded_node(&mut node, ip);
        Peer {
            xff: HeaderValue::from_str(&text).expect("an IP address is a valid header value"),
            node: node.into(),
            last: std::sync::Mutex::new(None),
        }
    }
}

/// Sets X-Forwarded-For/-Proto/-Host, Forwarded and Via on a request going upstream.
/// From a trusted peer, its X-Forwarded-* and Forwarded values are kept and extended; from any
/// other peer they are replaced, so a client cannot forge its own address.
pub fn set_forwarding(
    h: &mut HeaderMap,
    peer: &Peer,
    trusted: bool,
    host: &str,
    proto: &'static str,
    via: HeaderValue,
) {
    match trusted.then(|| joined(h, &X_FORWARDED_FOR)).flatten() {
        None => {
            h.insert(&X_FORWARDED_FOR, peer.xff.clone());
        }
        Some(mut xff) => {
            xff.push_str(", ");
            xff.push_str(peer.xff.to_str().unwrap_or_default());
            if let Ok(v) = HeaderValue::from_str(&xff) {
                h.insert(&X_FORWARDED_FOR, v);
            }
        }
    }
    if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(trusted && h.contains_key(&X_FORWARDED_HOST)) {
        let sent = h
            .get(header::HOST)
            .filter(|v| v.as_bytes() == host.as_bytes())
            .cloned();
        if let Some(v) = sent.or_else(|| HeaderValue::from_str(host).ok()) {
            h.insert(&X_FORWARDED_HOST, v);
        }
    }
    let prior = trusted.then(|| joined(h, &header::FORWARDED)).flatten();
    let alone = prior.is_none();
    if alone
        && let Some((_, _, v)) = peer
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(h, p, _)| **h == *host && *p == proto)
    {
        h.insert(header::FORWARDED, v.clone());
    } else {
        let mut fwd = extend(prior);
        fwd.push_str("for=");
        fwd.push_str(&peer.node);
        fwd.push_str(";host=");
        push_forwarded_value(&mut fwd, host);
        fwd.push_str(";proto=");
        fwd.push_str(proto);
        // The value takes the string's buffer as it is: no second allocation, no copy.
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(fwd.into_bytes())) {
            if alone {
                *peer.last.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((host.into(), proto, v.clone()));
            }
            h.insert(header::FORWARDED, v);
        }
    }
    h.append(header::VIA, via);
}

fn joined(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = h.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    let mut out = first.to_owned();
    for v in values {
        out.push_str(", ");
        out.push_str(v);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn forged_forwarding_from_untrusted_peer_is_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("forwarded", HeaderValue::from_static("for=6.6.6.6"));
        set_forwarding(
            &mut h,
            &Peer::new("192.0.2.1".parse().unwrap()),
            false,
            "api.example.com",
            "http",
            VIA_H1,
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1;host=api.example.com;proto=http"
        );
        assert_eq!(h["via"], "1.1 palisade");
    }

    #[test]
    fn trusted_peer_is_extended() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        set_forwarding(
            &mut h,
            &Peer::new("::1".parse().unwrap()),
            true,
            "h",
            "http",
            VIA_H1,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=\"[::1]\";host=h;proto=http");
    }

    #[test]
    fn one_connection_names_each_request_s_own_host_and_prior_values() {
        let peer = Peer::new("192.0.2.1".parse().unwrap());
        let forwarded =
            |host: &str, proto: &'static str, trusted: bool, prior: Option<&'static str>| {
                let mut h = HeaderMap::new();
                if let Some(p) = prior {
                    h.insert("forwarded", HeaderValue::from_static(p));
                }
                set_forwarding(&mut h, &peer, trusted, host, proto, VIA_H1);
                h["forwarded"].to_str().unwrap().to_owned()
            };
        for _ in 0..2 {
            assert_eq!(
                forwarded("a", "http", false, None),
                "for=192.0.2.1;host=a;proto=http"
            );
            assert_eq!(
                forwarded("b:8080", "http", false, None),
                "for=192.0.2.1;host=\"b:8080\";proto=http"
            );
            assert_eq!(
                forwarded("b:8080", "https", false, None),
                "for=192.0.2.1;host=\"b:8080\";proto=https"
            );
            assert_eq!(
                forwarded("a", "http", true, Some("for=203.0.113.9")),
                "for=203.0.113.9, for=192.0.2.1;host=a;proto=http"
            );
            assert_eq!(
                forwarded("a", "http", false, Some("for=6.6.6.6")),
                "for=192.0.2.1;host=a;proto=http"
            );
        }
    }

    #[test]
    fn trust_matches_networks() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(is_trusted("10.1.2.3".parse().unwrap(), &nets));
        assert!(is_trusted("::ffff:10.1.2.3".parse().unwrap(), &nets));
        assert!(!is_trusted("11.0.0.1".parse().unwrap(), &nets));
    }
}
