//! Writes the CRDs generated from `stratum-api` into a directory, one file per kind
//! (`crdgen crds/`), or prints them all to stdout (`crdgen`).

use std::path::PathBuf;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let out_dir = std::env::args_os().nth(1).map(PathBuf::from);
    for crd in stratum_api::crds() {
        let yaml = stratum_api::crd_yaml(&crd).context("serializing CRD")?;
        match &out_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join(stratum_api::crd_file_name(&crd));
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}
