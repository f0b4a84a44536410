//! Why a server refused a `.creds` file's user: its JWT expired (a server
//! says only "authorization violation").

use std::time::Duration;

/// Says so when the user JWT of the `NATS_CREDS` file expired before `now`
/// (its `exp` claim): a server refuses such a user with a bare
/// "authorization violation". Names the file, never its contents.
pub(super) fn expired_credentials(now: std::time::SystemTime) -> Option<String> {
    let path = std::env::var("NATS_CREDS").ok().filter(|p| !p.is_empty())?;
    let creds = std::fs::read_to_string(&path).ok()?;
    let expires = jwt_expiry(&creds)?;
    (expires <= now).then(|| {
        format!(
            "the user JWT in NATS_CREDS ({path}) expired at {}; issue new credentials",
            crate::protocol::pool_events::format_time(expires)
        )
    })
}

/// The `exp` claim of the user JWT in the text of a `.creds` file.
fn jwt_expiry(creds: &str) -> Option<std::time::SystemTime> {
    let mut lines = creds.lines().map(str::trim);
    lines.find(|l| l.contains("BEGIN NATS USER JWT"))?;
    let jwt = lines.next()?;
    let claims = jwt.split('.').nth(1)?;
    // JWTs are base64url without padding; some writers pad anyway.
    let claims = data_encoding::BASE64URL_NOPAD
        .decode(claims.trim_end_matches('=').as_bytes())
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&claims).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_of_a_creds_files_jwt_is_read() {
        use data_encoding::BASE64URL_NOPAD as B64;
        let jwt = |claims: &str| {
            format!(
                "{}.{}.c2ln",
                B64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
                B64.encode(claims.as_bytes())
            )
        };
        let creds = |jwt: String| {
            format!("-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\nSUAB\n------END USER NKEY SEED------\n")
        };
        let at = jwt_expiry(&creds(jwt(r#"{"sub":"U","exp":1700000000}"#)));
        assert_eq!(
            at,
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(jwt_expiry(&creds(jwt(r#"{"sub":"U"}"#))), None);
        assert_eq!(jwt_expiry("not a creds file"), None);
        assert_eq!(jwt_expiry(&creds("a.%%%.b".into())), None);
    }
}
