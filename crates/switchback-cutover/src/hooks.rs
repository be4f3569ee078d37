//! Hook commands (`fence_hook`, `unfence_hook`, `open_hook`): run with `sh -c`,
//! with a few SWITCHBACK_* variables; a non-zero exit stops the switch.

use crate::CutoverError;

pub async fn run_hook(which: &str, cmd: &str, env: &[(&str, &str)]) -> Result<(), CutoverError> {
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c").arg(cmd);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c
        .output()
        .await
        .map_err(|e| CutoverError::Failed(format!("[cutover] {which}: cannot start sh: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(CutoverError::Failed(format!(
            "[cutover] {which} failed ({}): {}",
            out.status,
            stderr.trim()
        )));
    }
    Ok(())
}
