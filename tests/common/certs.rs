//! Test certificates (rcgen): a CA of a test's own and the server and client certificates it
//! signs, and the percent-encoding of the file paths that name them in a URL.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A test CA: its certificate, and what signs with it.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "sqlnotify test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// The CA's certificate (PEM).
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate (PEM) for `names` with the common name `cn`, and its new key (PEM).
    pub fn issue(&self, cn: &str, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        (self.issue_for(&key, cn, names), key.serialize_pem())
    }

    /// A certificate (PEM) for `key`, `names` and the common name `cn`.
    pub fn issue_for(&self, key: &KeyPair, cn: &str, names: &[&str]) -> String {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.signed_by(key, &self.cert, &self.key).unwrap().pem()
    }
}

/// `text` with every byte but letters, digits, `-`, `.` and `_` percent-encoded (a file path
/// as a URL parameter's value).
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
