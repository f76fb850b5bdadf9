//! Watching files for live reload. Directories are watched, not files: editors and Kubernetes
//! (ConfigMap and Secret volumes swap a `..data` symlink) replace files rather than write them,
//! and a watch on the old inode would go quiet. Any event in a watched directory wakes the
//! receiver; the consumer re-reads and compares, so spurious wake-ups cost only a read.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Keeps the OS watch alive; dropping it stops the notifications.
pub struct FileWatch {
    _watcher: RecommendedWatcher,
}

/// Watches the directories holding `files`. The receiver gets one tick per burst of changes
/// (bursts are coalesced: a tick means "look again").
pub fn watch_files(files: &[PathBuf]) -> notify::Result<(FileWatch, mpsc::Receiver<()>)> {
    let (tx, rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            // A full channel already holds a pending tick: nothing is lost.
            let _ = tx.try_send(());
        }
    })?;
    let dirs: BTreeSet<PathBuf> = files.iter().map(|f| parent_dir(f)).collect();
    for dir in dirs {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    }
    Ok((FileWatch { _watcher: watcher }, rx))
}

fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Waits for the next tick, then lets a burst settle so a half-written file is not read.
pub async fn next_change(rx: &mut mpsc::Receiver<()>) -> Option<()> {
    rx.recv().await?;
    tokio::time::sleep(Duration::from_millis(150)).await;
    while rx.try_recv().is_ok() {}
    Some(())
}
