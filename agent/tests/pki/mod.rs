//! A test PKI made with openssl: a CA, and a server certificate it signed for localhost, 127.0.0.1
//! and 127.0.0.2 (two agents behind one name, as a tenant Service is in a cluster). It is
//! shared by the NTS tests (`#[path = "pki/mod.rs"] mod pki;`).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A CA and a server certificate for 127.0.0.1 and localhost it signed, made with openssl.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn make_pki(dir: &Path, name: &str) -> Pki {
    make_pki_for(dir, name, "DNS:localhost,IP:127.0.0.1,IP:127.0.0.2")
}

/// As [`make_pki`], the server certificate naming `subject_alt_names` (openssl's syntax:
/// `DNS:ntp.team-a.svc.cluster.local,IP:10.79.0.12`).
pub fn make_pki_for(dir: &Path, name: &str, subject_alt_names: &str) -> Pki {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend(["-keyout", &ca_key, "-out", &ca, "-days", "2", "-subj"]);
    let ca_subject = format!("/CN=stratum test CA {name}");
    args.push(&ca_subject);
    openssl(dir, &args);
    let key = format!("{name}-server.key");
    let csr = format!("{name}-server.csr");
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
    openssl(dir, &args);
    let ext = format!("{name}-ext.cnf");
    std::fs::write(
        dir.join(&ext),
        format!(
            "subjectAltName={subject_alt_names}\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
    let cert = format!("{name}-server.pem");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
    // chronyd may read them after dropping to its own user.
    for file in [&key, &cert] {
        let path = dir.join(file);
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        std::fs::set_permissions(&path, perms).unwrap();
    }
    Pki {
        ca: dir.join(ca),
        cert: dir.join(cert),
        key: dir.join(key),
    }
}
