//! The example configs in `deploy/config` stay valid: each passes
//! `lmgrid <service> --check`.

use std::path::Path;
use std::process::Command;

#[test]
fn every_example_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config");
    for (subcommand, file) in [
        ("gateway", "gateway.yaml"),
        ("dispatcher", "dispatcher.yaml"),
        ("worker", "worker.yaml"),
        ("registry", "registry.yaml"),
        ("notify", "notify.yaml"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_lmgrid"))
            .args([subcommand, "--check", "--config"])
            .arg(dir.join(file))
            .env_remove("LMGRID_CONFIG")
            .output()
            .expect("run lmgrid");
        assert!(
            output.status.success(),
            "{file} is invalid: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
