//! `bulkhead backup`, `bulkhead restore` and `bulkhead recover`: copying a stopped node's data,
//! starting a node over without ever letting it vote with a log older than the one it
//! acknowledged from, and keeping a survivor's data after a lost majority.
//!
//! Why a restore never puts old Raft state back in place while the cluster runs: a replica that
//! acknowledged entries and then comes back with an older log and an older vote has forgotten what
//! it promised, and Raft's safety rests on that promise. A two-fault sequence shows the cost:
//! back up n1; stop n3; place orders (committed on n1 and n2); restore n1's backup and start n1
//! and n3 while n2 is down: n1 and n3 are a majority that lacks the orders, elect a leader, and a
//! client's retry with the same Idempotency-Key places a second order (`tests/restore.rs` plays
//! both ways). So [`restore`] moves the node's data dir aside (never deleting it) and lets the
//! node start empty: each of its stores draws a new incarnation, so it is a new member of every
//! group, which the leader adds as a learner, catches up (by snapshot when the log was purged) and
//! only then swaps in for the old member. While a group has no majority without the old member,
//! it serves nothing (503) rather than serve from a stale pair.
//!
//! What a backup is for, then: the day every replica of a group is gone. Restoring *every* node
//! from backups taken in one cluster-wide stop puts the cluster back as of that moment, whole
//! (docs/operations.md, "Backups").
//!
//! After a lost majority, [`recover`] makes the chosen survivor's replicas their groups' only
//! voters (`bulkhead_cluster::raft::recover`); the others then come back through [`restore`].
//!
//! Every command refuses a running node: they take the node log's lock, as the node does.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use bulkhead_actors::Capability;
use bulkhead_launch::config::NodeConfig;

/// Holds the node log's lock of `data_dir` (so no node runs on it) until dropped. A data dir
/// with no node log yet has nothing to lock and nothing a node could be writing.
fn lock_stopped(data_dir: &Path) -> Result<Option<File>, String> {
    let lock = data_dir.join("raft-log").join("LOCK");
    if !lock.exists() {
        return Ok(None);
    }
    let f = File::options()
        .read(true)
        .write(true)
        .open(&lock)
        .map_err(|e| format!("cannot open {}: {e}", lock.display()))?;
    f.try_lock().map_err(|_| {
        format!("a node is running on {}: stop it first (`systemctl stop bulkhead`)", data_dir.display())
    })?;
    Ok(Some(f))
}

fn copy_tree(from: &Path, to: &Path) -> Result<u64, String> {
    std::fs::create_dir_all(to).map_err(|e| format!("cannot create {}: {e}", to.display()))?;
    let mut bytes = 0;
    let entries = std::fs::read_dir(from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", from.display()))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        if kind.is_dir() {
            bytes += copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            bytes += std::fs::copy(&src, &dst)
                .map_err(|e| format!("cannot copy {} to {}: {e}", src.display(), dst.display()))?;
        } else if kind.is_symlink() {
            // Part of the data may live elsewhere (`raft-log` on another disk): a backup that
            // skipped it would be reported whole and restore half a node.
            return Err(format!(
                "{} is a symlink: back up a data dir without links (or copy its target yourself)",
                src.display()
            ));
        }
        // Anything else (a socket) is no part of a node's data.
    }
    Ok(bytes)
}

/// `bulkhead backup --config C --to DIR`: copies the stopped node's data dir to
/// `DIR/<node>-<unix seconds>/`. Back up every node in one cluster-wide stop if the copies are
/// ever to be restored (see the module doc).
pub fn backup(cfg: &NodeConfig, to: &Path, out: &mut dyn Write) -> Result<PathBuf, String> {
    let _lock = lock_stopped(&cfg.data_dir)?;
    if !cfg.data_dir.exists() {
        return Err(format!("{} does not exist: nothing to back up", cfg.data_dir.display()));
    }
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let dest = to.join(format!("{}-{secs}", cfg.name));
    if dest.exists() {
        return Err(format!("{} exists: refusing to mix two backups", dest.display()));
    }
    let bytes = copy_tree(&cfg.data_dir, &dest)?;
    let _ = writeln!(out, "backed up {} to {} ({bytes} bytes)", cfg.data_dir.display(), dest.display());
    Ok(dest)
}

/// `bulkhead restore --config C`: the stopped node starts over as a new member of every group.
/// Its data dir is moved aside to `<data_dir>.before-restore-<unix seconds>` (kept: it is the
/// operator's to delete), and an empty one takes its place; at its next start the node catches up
/// from the current leaders.
pub fn restore(cfg: &NodeConfig, out: &mut dyn Write) -> Result<PathBuf, String> {
    // A group with no other replica would start over empty from this node: its data exists
    // nowhere else. That is a cluster-wide restore (docs/operations.md, "Backups"), not this.
    let map = cfg.capabilities.shard_map();
    let alone: Vec<String> = Capability::ALL
        .into_iter()
        .flat_map(|cap| map.shards(cap).into_iter().map(move |p| (cap, p)))
        .filter(|(_, p)| p.replicas == [cfg.name.clone()])
        .map(|(cap, p)| format!("{cap}/{}", p.shard))
        .collect();
    if !alone.is_empty() {
        return Err(format!(
            "{} is the only replica of {}: starting it over would start those groups over empty. Keep its data dir.",
            cfg.name,
            alone.join(", ")
        ));
    }
    let lock = lock_stopped(&cfg.data_dir)?;
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut aside = cfg.data_dir.clone().into_os_string();
    aside.push(format!(".before-restore-{secs}"));
    let aside = PathBuf::from(aside);
    if aside.exists() {
        return Err(format!("{} exists: wait a second and run it again", aside.display()));
    }
    if cfg.data_dir.exists() {
        std::fs::rename(&cfg.data_dir, &aside)
            .map_err(|e| format!("cannot move {} to {}: {e}", cfg.data_dir.display(), aside.display()))?;
    }
    drop(lock);
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| format!("cannot create {}: {e}", cfg.data_dir.display()))?;
    let _ = writeln!(
        out,
        "{} moved to {}; {} starts empty at its next start and rejoins every group as a new member, \
         caught up from the current leaders (it never votes with the old log). Watch /v1/cluster until \
         every shard lists {} as a voter with lag 0.",
        cfg.data_dir.display(),
        aside.display(),
        cfg.name,
        cfg.name
    );
    Ok(aside)
}

/// `bulkhead recover --config C [--inspect] [--group CAP/SHARD]...`: after a lost majority, on the
/// stopped node whose replica is to be kept, makes that replica its group's only voter (every
/// group this node hosts, or the `--group`s named). `--inspect` only prints each replica's last
/// entry (term, index) and vote: run it on every survivor and keep, per group, the one furthest
/// ahead. See `bulkhead_cluster::raft::recover`.
pub async fn recover(
    cfg: &NodeConfig,
    inspect_only: bool,
    groups: &[String],
    out: &mut dyn Write,
) -> Result<(), String> {
    use bulkhead_cluster::raft::{recover, GroupId, NODE_LOG_DIR};
    use bulkhead_storage::{NodeLog, Store, StoreOptions};
    let mut chosen = Vec::new();
    let map = cfg.capabilities.shard_map();
    for cap in Capability::ALL {
        for placement in map.shards(cap) {
            let group = GroupId::new(cap, placement.shard);
            let named = groups.is_empty() || groups.iter().any(|g| *g == group.to_string());
            if placement.replicas.contains(&cfg.name) && named {
                chosen.push(group);
            }
        }
    }
    if let Some(unknown) = groups.iter().find(|g| !chosen.iter().any(|c| c.to_string() == **g)) {
        return Err(format!("{} hosts no group `{unknown}` (groups are named like orders/0)", cfg.name));
    }
    // The node log takes its lock: a running node makes this fail, which is what we want.
    let log = NodeLog::open(&cfg.data_dir.join(NODE_LOG_DIR), cfg.durability)
        .map_err(|e| format!("{e}: if the node is running, stop it first (`systemctl stop bulkhead`)"))?;
    let opts = StoreOptions { durability: cfg.durability, ..StoreOptions::default() };
    for group in chosen {
        let name = format!("{}-{}", group.capability, group.shard);
        if !cfg.data_dir.join(&name).exists() {
            let _ = writeln!(out, "{group}: no store in {}: nothing to keep here", cfg.data_dir.display());
            continue;
        }
        let store = Store::open(&cfg.data_dir, &name, &opts).map_err(|e| e.to_string())?;
        if inspect_only {
            let facts = recover::inspect(&log, &store, &cfg.name, group).await?;
            let _ = writeln!(out, "{facts}");
        } else {
            let (facts, term) = recover::force_sole_voter(&log, &store, &cfg.name, group).await?;
            let _ = writeln!(out, "{facts}\n  -> now its only voter (membership entry in term {term})");
        }
        store.sync().await.map_err(|e| e.to_string())?;
    }
    if !inspect_only {
        let _ = writeln!(
            out,
            "Start {} now: it elects itself in each group above and serves. Bring every other node of those \
             groups back only as a new member (`bulkhead restore --config ...` on it first, or an empty disk): \
             a node that kept its old data could form a second majority with another.",
            cfg.name
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> NodeConfig {
        let mut cfg: NodeConfig = toml::from_str(include_str!("../deploy/n1.toml")).expect("the example config");
        cfg.data_dir = dir.join("data");
        cfg
    }

    #[test]
    fn a_backup_copies_and_a_restore_moves_aside_and_neither_touches_a_running_node() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        std::fs::create_dir_all(cfg.data_dir.join("raft-log")).unwrap();
        std::fs::create_dir_all(cfg.data_dir.join("orders-0")).unwrap();
        std::fs::write(cfg.data_dir.join("orders-0").join("db"), b"state").unwrap();
        std::fs::write(cfg.data_dir.join("raft-log").join("LOCK"), b"").unwrap();

        // A running node holds the lock: both commands refuse, and change nothing.
        let running = File::options().write(true).open(cfg.data_dir.join("raft-log").join("LOCK")).unwrap();
        running.try_lock().unwrap();
        let mut out = Vec::new();
        assert!(backup(&cfg, &dir.path().join("b"), &mut out).unwrap_err().contains("stop it first"));
        assert!(restore(&cfg, &mut out).unwrap_err().contains("stop it first"));
        assert!(cfg.data_dir.join("orders-0").join("db").exists());
        drop(running);

        let copy = backup(&cfg, &dir.path().join("b"), &mut out).unwrap();
        assert_eq!(std::fs::read(copy.join("orders-0").join("db")).unwrap(), b"state");
        let aside = restore(&cfg, &mut out).unwrap();
        assert_eq!(std::fs::read(aside.join("orders-0").join("db")).unwrap(), b"state", "kept, not deleted");
        assert_eq!(std::fs::read_dir(&cfg.data_dir).unwrap().count(), 0, "the node starts empty");
    }

    /// A node that is the only replica of a group keeps its data: starting it over would start the
    /// group over empty.
    #[test]
    fn the_only_replica_of_a_group_is_not_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.capabilities.0.insert(Capability::Payments, bulkhead_cluster::config::CapabilityPlacement::on(&["n1"]));
        std::fs::create_dir_all(cfg.data_dir.join("payments-0")).unwrap();
        let e = restore(&cfg, &mut Vec::new()).unwrap_err();
        assert!(e.contains("only replica of payments/0"), "{e}");
        assert!(cfg.data_dir.join("payments-0").exists());
    }

    /// A backup never skips part of the data in silence: a link in the data dir is refused.
    #[cfg(unix)]
    #[test]
    fn a_backup_refuses_a_data_dir_with_links() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
        std::fs::create_dir_all(&cfg.data_dir).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), cfg.data_dir.join("raft-log")).unwrap();
        let e = backup(&cfg, &dir.path().join("b"), &mut Vec::new()).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
    }
}
