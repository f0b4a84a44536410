//! NATS URLs: lists of servers, loopback-only addresses, and a URL shown
//! without its credentials.

/// The servers of a URL list: `nats://a:4222, nats://b:4222`.
pub(crate) fn server_list(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect()
}

/// True when every server of `url` is on this machine (`localhost`,
/// `127.x.y.z`, `::1`): an address other machines cannot reach.
pub(crate) fn only_loopback(url: &str) -> bool {
    let servers = server_list(url);
    !servers.is_empty()
        && servers.iter().all(|server| {
            let rest = server.split_once("://").map_or(server.as_str(), |(_, r)| r);
            let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
            let host = if let Some(v6) = rest.strip_prefix('[') {
                v6.split(']').next().unwrap_or("")
            } else {
                rest.split(':').next().unwrap_or("")
            };
            host == "localhost"
                || host == "::1"
                || host
                    .parse::<std::net::Ipv4Addr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
}

/// `url` with any `user:password@` or `token@` taken out, for logs,
/// errors and what runners are told.
pub fn without_credentials(url: &str) -> String {
    server_list(url)
        .iter()
        .map(|server| match (server.find("://"), server.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}{}", &server[..scheme + 3], &server[at + 1..])
            }
            (None, Some(at)) => server[at + 1..].to_string(),
            _ => server.clone(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_lists_split_on_commas() {
        assert_eq!(server_list("nats://a:1"), vec!["nats://a:1"]);
        assert_eq!(
            server_list(" nats://a:1 ,nats://b:2,, "),
            vec!["nats://a:1", "nats://b:2"]
        );
        assert!(server_list(" , ").is_empty());
    }

    #[test]
    fn loopback_urls_are_told_apart() {
        assert!(only_loopback("nats://127.0.0.1:4222"));
        assert!(only_loopback("localhost:4222, nats://[::1]:4222"));
        assert!(only_loopback("nats://u:p@127.0.0.2:1"));
        assert!(!only_loopback("nats://127.0.0.1:4222,nats://10.0.0.5:4222"));
        assert!(!only_loopback("tls://nats.internal:4222"));
        assert!(!only_loopback("nats://[fdaa::3]:4222"));
    }

    #[test]
    fn credentials_are_taken_out_of_urls() {
        assert_eq!(
            without_credentials("nats://user:s3cret@a:4222, tls://tok@b:4223,nats://c:1"),
            "nats://a:4222,tls://b:4223,nats://c:1"
        );
        assert_eq!(without_credentials("u:p@host:4222"), "host:4222");
    }
}
