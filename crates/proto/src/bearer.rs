//! The credential every call carries: `authorization: Bearer <credential>` in its metadata.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

/// Adds a bearer credential (an API key or a node credential) to every request of a client;
/// without one, requests go out bare (for servers started with `--no-auth`).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    // The value is a secret: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Bearer").field(&self.0.as_ref().map(|_| "…")).finish()
    }
}

/// A credential that cannot be sent in a header (it holds characters headers do not allow).
#[derive(Debug, thiserror::Error)]
#[error("the credential holds characters a header cannot carry; copy it again")]
pub struct BadCredential;

impl Bearer {
    /// A bearer of `credential`, or one that sends nothing.
    pub fn new(credential: Option<&str>) -> Result<Bearer, BadCredential> {
        match credential {
            None => Ok(Bearer(None)),
            Some(c) => {
                let mut value: MetadataValue<Ascii> =
                    format!("Bearer {}", c.trim()).parse().map_err(|_| BadCredential)?;
                value.set_sensitive(true);
                Ok(Bearer(Some(value)))
            }
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_header_and_hides_it() {
        let mut bearer = Bearer::new(Some("drv_x_y")).unwrap();
        let req = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("authorization").unwrap(), "Bearer drv_x_y");
        assert!(!format!("{bearer:?}").contains("drv_"));
        let req = Bearer::new(None).unwrap().call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        assert!(Bearer::new(Some("bad\nkey")).is_err());
    }
}
