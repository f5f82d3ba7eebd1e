//! Skiff's cluster CA: certificates for the API server, admins and agents,
//! join tokens, and who a presented certificate names.
//!
//! Every function takes the current time as an argument; nothing here reads
//! a clock. Keys are ECDSA P-256.

pub mod signed;

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid certificate: {0}")]
    Invalid(String),
}

pub type Result<T, E = IdentityError> = std::result::Result<T, E>;

/// Who a credential belongs to, and so what it may do.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A cluster administrator: may do everything.
    Admin { name: String },
    /// A node agent: may write only its own Node and its instances' status.
    Node { name: String },
}

impl Principal {
    /// The certificate subject organisation (group) that carries the role.
    fn group(&self) -> &'static str {
        match self {
            Principal::Admin { .. } => GROUP_ADMINS,
            Principal::Node { .. } => GROUP_NODES,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Principal::Admin { name } | Principal::Node { name } => name,
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Admin { name } => write!(f, "admin {name}"),
            Principal::Node { name } => write!(f, "node {name}"),
        }
    }
}

const GROUP_ADMINS: &str = "skiff:admins";
const GROUP_NODES: &str = "skiff:nodes";

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// The cluster certificate authority.
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
    issuer_params: CertificateParams,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA named after the cluster.
    pub fn generate(cluster: &str, now: OffsetDateTime, validity: Duration) -> Result<Ca> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("skiff-ca {cluster}"), "skiff");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity_window(&mut params, now, validity);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
            issuer_params: params,
        })
    }

    /// Loads a CA written by [`Ca::cert_pem`] and [`Ca::key_pem`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, &key)?;
        let mut issuer_params = CertificateParams::default();
        issuer_params.distinguished_name = issuer_dn(cert_pem)?;
        issuer_params.key_usages = issuer.key_usages().to_vec();
        drop(issuer);
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            key,
            issuer_params,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key. Keep it on the server only.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A client certificate (and a fresh key) for `principal`.
    pub fn issue_client(
        &self,
        principal: &Principal,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<Issued> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(principal.name(), principal.group());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity_window(&mut params, now, validity);
        self.sign(params)
    }

    /// A server certificate for the given DNS names and IP addresses.
    pub fn issue_server(
        &self,
        hosts: &[String],
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<Issued> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("skiff-server", "skiff");
        params.subject_alt_names = hosts
            .iter()
            .map(|h| match h.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(h.clone().try_into()?)),
            })
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity_window(&mut params, now, validity);
        self.sign(params)
    }

    /// A workload certificate for `id`, signed over the public key of a
    /// certificate signing request made on the node (see [`workload_csr`]),
    /// so the workload's private key never leaves its node. Only the CSR's
    /// key is used: the identity, usages and lifetime are the CA's choice,
    /// whatever the request asked for. Fails when the CSR's signature does
    /// not verify.
    pub fn sign_workload(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<String> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IdentityError::Invalid(format!("certificate signing request: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&id.service_account, &format!("ns:{}", id.namespace));
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity_window(&mut params, now, validity);
        let issuer = Issuer::from_params(&self.issuer_params, &self.key);
        let request = rcgen::CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        Ok(request.signed_by(&issuer)?.pem())
    }

    fn sign(&self, params: CertificateParams) -> Result<Issued> {
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.issuer_params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn dn(common_name: &str, organization: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, organization);
    dn
}

fn validity_window(params: &mut CertificateParams, now: OffsetDateTime, validity: Duration) {
    // A minute of slack for clocks that disagree a little.
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + validity;
}

fn issuer_dn(cert_pem: &str) -> Result<DistinguishedName> {
    let (cn, groups) = subject_of(&pem_to_der(cert_pem)?)?;
    Ok(dn(
        cn.as_deref().unwrap_or_default(),
        groups.first().map(String::as_str).unwrap_or_default(),
    ))
}

/// A certificate's subject common name and organisations.
fn subject_of(der: &[u8]) -> Result<(Option<String>, Vec<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Invalid(e.to_string()))?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(String::from);
    let groups = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok())
        .map(String::from)
        .collect();
    Ok((cn, groups))
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| IdentityError::Invalid(format!("bad PEM: {e}")))
}

/// Who a verified client certificate (DER) names. The TLS layer has
/// already checked the chain and validity; this reads the subject.
pub fn principal_of(cert_der: &[u8]) -> Result<Principal> {
    let (cn, groups) = subject_of(cert_der)?;
    let cn = cn.ok_or_else(|| IdentityError::Invalid("no common name".into()))?;
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    if groups.contains(&GROUP_ADMINS) {
        Ok(Principal::Admin {
            name: cn.to_string(),
        })
    } else if groups.contains(&GROUP_NODES) {
        Ok(Principal::Node {
            name: cn.to_string(),
        })
    } else {
        Err(IdentityError::Invalid(format!(
            "certificate for {cn} carries no Skiff role"
        )))
    }
}

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
/// One that exists is well formed: every part is a non-empty DNS-label-like
/// string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<SpiffeId> {
        for (what, part) in [
            ("trust domain", trust_domain),
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            let ok = !part.is_empty()
                && part.len() <= 253
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
            if !ok {
                return Err(IdentityError::Invalid(format!(
                    "{what} {part:?}: use lower-case letters, digits, '-', '.' or '_'"
                )));
            }
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<SpiffeId> {
        let bad = || {
            IdentityError::Invalid(format!(
                "{s:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service>"
            ))
        };
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A fresh workload key and a signing request for `id`, made where the
/// workload runs. Returns `(key_pem, csr_pem)`; send only the CSR.
pub fn workload_csr(id: &SpiffeId) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&id.service_account, &format!("ns:{}", id.namespace));
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// The SPIFFE identity a verified certificate (DER) carries in its URI
/// subject alternative name, if any.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<Option<SpiffeId>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| IdentityError::Invalid(e.to_string()))?;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Ok(None);
    };
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name
            && uri.starts_with("spiffe://")
        {
            return uri.parse().map(Some);
        }
    }
    Ok(None)
}

/// When a certificate (DER) stops being valid, in seconds since the epoch.
pub fn not_after_unix(cert_der: &[u8]) -> Result<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| IdentityError::Invalid(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// A new secret token: 32 random bytes, URL-safe base64, with a prefix
/// that makes leaked tokens easy to find.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "skiff-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Compares a presented token with the expected one in constant time.
pub fn token_matches(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses PEM certificates for rustls.
pub fn certs_from_pem(pem: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Invalid(format!("bad certificate PEM: {e}")))
}

/// Parses a PEM private key for rustls.
pub fn key_from_pem(pem: &str) -> Result<rustls_pki_types::PrivateKeyDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| IdentityError::Invalid(format!("bad key PEM: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn workload_certificates_carry_the_identity_the_ca_chose() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::generate("test", now, 365 * DAY).unwrap();
        let asked = SpiffeId::new("skiff.local", "shop", "admin").unwrap();
        let (_key, csr) = workload_csr(&asked).unwrap();
        // The CA signs the key for the identity it authorised, not the one asked.
        let granted: SpiffeId = "spiffe://skiff.local/ns/shop/sa/web".parse().unwrap();
        let pem = ca.sign_workload(&csr, &granted, now, DAY).unwrap();
        let der = certs_from_pem(&pem).unwrap().remove(0);
        assert_eq!(spiffe_id_of(&der).unwrap(), Some(granted));
        let expiry = not_after_unix(&der).unwrap();
        assert!((expiry - (now + DAY).unix_timestamp()).abs() <= 1);
        let mut tampered = csr.clone();
        tampered.insert(tampered.len() / 2, 'A');
        assert!(ca.sign_workload(&tampered, &asked, now, DAY).is_err());
    }

    #[test]
    fn spiffe_ids_parse_only_in_their_one_form() {
        let id: SpiffeId = "spiffe://td/ns/a/sa/b".parse().unwrap();
        assert_eq!(id.to_string(), "spiffe://td/ns/a/sa/b");
        for bad in [
            "spiffe://td/ns/a",
            "http://td/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://TD/ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn issued_certificates_name_their_principal() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::generate("test", now, 365 * DAY).unwrap();
        for p in [
            Principal::Admin {
                name: "admin".into(),
            },
            Principal::Node {
                name: "node-1".into(),
            },
        ] {
            let issued = ca.issue_client(&p, now, DAY).unwrap();
            let der = certs_from_pem(&issued.cert_pem).unwrap();
            assert_eq!(principal_of(&der[0]).unwrap(), p);
            key_from_pem(&issued.key_pem).unwrap();
        }
        // A server certificate carries no client role.
        let server = ca
            .issue_server(&["127.0.0.1".into(), "localhost".into()], now, DAY)
            .unwrap();
        assert!(principal_of(&certs_from_pem(&server.cert_pem).unwrap()[0]).is_err());
    }

    #[test]
    fn a_reloaded_ca_signs_for_the_same_chain() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::generate("test", now, 365 * DAY).unwrap();
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let issued = again
            .issue_client(&Principal::Admin { name: "a".into() }, now, DAY)
            .unwrap();
        let (leaf_der, root_der) = (
            pem_to_der(&issued.cert_pem).unwrap(),
            pem_to_der(ca.cert_pem()).unwrap(),
        );
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
        leaf.verify_signature(Some(root.public_key())).unwrap();
    }

    #[test]
    fn tokens_are_random_and_compared_exactly() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("skiff-") && a.len() > 40);
        assert!(token_matches(&a, &a.clone()));
        assert!(!token_matches(&a, &b));
        assert!(!token_matches(&a[..10], &a));
    }
}
