//! URLs of settings, checked once at load. Each keeps the text as written (a `notifyUrl` is
//! signed and sent as given), and its `Debug` hides any `user:password@` part.

use std::fmt;

/// A URL with any `user:password@` part replaced, for printing.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            let _ = parsed.set_username("[redacted]");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "[unparseable url]".to_owned(),
    }
}

/// An absolute `http://` or `https://` URL with a host.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl {
    text: String,
    url: reqwest::Url,
}

impl HttpUrl {
    /// The reason is a rule, never the value (it may carry credentials).
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        match reqwest::Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                Ok(Self {
                    text: text.to_owned(),
                    url,
                })
            }
            _ => Err("must be an absolute http:// or https:// URL"),
        }
    }

    /// The URL as written in the settings.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }
}

impl fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.text))
    }
}

impl PartialEq<&str> for HttpUrl {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

/// A `redis://`, `rediss://` or `unix://` URL, as the redis client takes it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let known = ["redis://", "rediss://", "unix://"];
        let seeds = crate::redis_conn::seeds(text);
        let valid = |seed: &&str| known.iter().any(|scheme| seed.starts_with(scheme));
        if !seeds.is_empty() && seeds.iter().all(valid) {
            Ok(Self(text.to_owned()))
        } else {
            Err(
                "must be one URL, or a comma-separated list of cluster seeds, each starting with redis://, rediss:// or unix://",
            )
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seeds: Vec<String> = crate::redis_conn::seeds(&self.0)
            .into_iter()
            .map(redact_url)
            .collect();
        f.write_str(&seeds.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_their_text_and_hide_credentials() {
        let url = HttpUrl::parse("https://user:pw@merchant.example").unwrap();
        assert_eq!(url.as_str(), "https://user:pw@merchant.example");
        assert!(!format!("{url:?}").contains("pw"));
        assert!(HttpUrl::parse("ftp://merchant.example").is_err());
        assert!(HttpUrl::parse("/relative").is_err());
        let redis = RedisUrl::parse("redis://:s3cret@r:6379/0").unwrap();
        assert!(!format!("{redis:?}").contains("s3cret"));
        assert!(RedisUrl::parse("localhost:6379").is_err());
        let seeds = RedisUrl::parse("redis://:pw1@a:7000, redis://:pw2@b:7001").unwrap();
        let shown = format!("{seeds:?}");
        assert!(!shown.contains("pw1") && !shown.contains("pw2"), "{shown}");
        assert!(RedisUrl::parse("redis://a:7000,b:7001").is_err());
        assert!(RedisUrl::parse(" , ").is_err());
    }
}
