use super::*;
use crate::{now, Inventory};

const HOUR: Duration = Duration::from_secs(3600);

fn lease(mac: &str, ip: &str) -> Lease {
    Lease {
        mac: mac.into(),
        ip: ip.parse().unwrap(),
        expires: Some(now() + 600),
        state: "bound".into(),
        hostname: Some(format!("h-{mac}")),
    }
}

/// An inventory in a fresh directory, and its database path.
fn inventory() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("inv.db");
    Inventory::open(&db).unwrap();
    (d, db)
}

/// What the table alone holds.
fn table(db: &Path) -> Vec<Lease> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut v = crate::all_leases(&c).unwrap();
    v.sort_by_key(|l| l.ip);
    v
}

/// Copies the inventory's files as they are on disk now: what a restart after `kill -9` finds.
fn crash_copy(db: &Path) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(db.parent().unwrap()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".lock") {
            continue;
        }
        std::fs::copy(e.path(), d.path().join(&name)).unwrap();
    }
    let copy = d.path().join(db.file_name().unwrap());
    (d, copy)
}

#[test]
fn put_release_remove_in_memory_and_after_a_fold() {
    let (_d, db) = inventory();
    let b = LeaseBook::open_folding_every(&db, HOUR).unwrap();
    let a = lease("aa:00:00:00:00:01", "10.213.100.1");
    b.put(a.clone()).unwrap();
    assert_eq!(b.get(&a.mac), Some(a.clone()));
    assert!(b.held_by_other(a.ip, "bb:00:00:00:00:02", now()));
    assert!(!b.held_by_other(a.ip, &a.mac, now()));
    // Expired leases hold nothing.
    assert!(!b.held_by_other(a.ip, "bb:00:00:00:00:02", now() + 601));
    b.commit().unwrap();

    // Moving to another address frees the old one; another MAC taking an address drops the
    // lease that had it.
    let a2 = lease(&a.mac, "10.213.100.2");
    b.put(a2.clone()).unwrap();
    assert!(!b.held_by_other(a.ip, "bb:00:00:00:00:02", now()));
    let c = lease("cc:00:00:00:00:03", "10.213.100.2");
    b.put(c.clone()).unwrap();
    assert_eq!(b.get(&a.mac), None);
    b.release(&c.mac, now()).unwrap();
    assert_eq!(b.get(&c.mac).unwrap().state, "released");
    assert!(!b.held_by_other(c.ip, "bb:00:00:00:00:02", now() + 1));
    let d = lease("dd:00:00:00:00:04", "10.213.100.4");
    b.put(d.clone()).unwrap();
    b.remove(&d.mac).unwrap();
    b.commit().unwrap();

    // Nothing in the table yet (no fold), but every reader sees the leases.
    assert!(table(&db).is_empty());
    let inv = Inventory::open(&db).unwrap();
    let listed = inv.leases().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].mac, c.mac);
    assert_eq!(listed[0].state, "released");
    b.flush().unwrap();
    assert_eq!(table(&db), listed);
    assert_eq!(inv.leases().unwrap(), listed);
    // Folded segments are gone; one empty segment is open.
    let segs = segments(&db).unwrap();
    assert_eq!(segs.len(), 1, "{segs:?}");
    assert_eq!(std::fs::metadata(&segs[0].1).unwrap().len(), 8);
}

#[test]
fn a_restart_after_a_crash_replays_the_journal() {
    let (_d, db) = inventory();
    let b = LeaseBook::open_folding_every(&db, HOUR).unwrap();
    let mut want = Vec::new();
    for i in 1..=50u8 {
        let l = lease(
            &format!("aa:00:00:00:00:{i:02x}"),
            &format!("10.213.100.{i}"),
        );
        b.put(l.clone()).unwrap();
        want.push(l);
        if i % 7 == 0 {
            b.commit().unwrap();
        }
    }
    b.commit().unwrap();
    // Staged but never committed: not durable, not replayed.
    b.put(lease("ee:00:00:00:00:01", "10.213.100.99")).unwrap();
    let (_c, copy) = crash_copy(&db);
    assert!(table(&copy).is_empty());

    let b2 = LeaseBook::open_folding_every(&copy, HOUR).unwrap();
    for l in &want {
        assert_eq!(b2.get(&l.mac).as_ref(), Some(l));
    }
    assert_eq!(b2.get("ee:00:00:00:00:01"), None);
    // Start-up folded the old journal into the table and removed it.
    assert_eq!(table(&copy), want);
    assert_eq!(segments(&copy).unwrap().len(), 1);
}

#[test]
fn a_torn_tail_keeps_the_records_before_it() {
    let (_d, db) = inventory();
    let b = LeaseBook::open_folding_every(&db, HOUR).unwrap();
    let x = lease("aa:00:00:00:00:01", "10.213.100.1");
    let y = lease("aa:00:00:00:00:02", "10.213.100.2");
    b.put(x.clone()).unwrap();
    b.commit().unwrap();
    b.put(y.clone()).unwrap();
    b.commit().unwrap();
    let seg = segments(&db).unwrap().pop().unwrap().1;
    let whole = std::fs::read(&seg).unwrap();

    for (what, bytes) in [
        ("cut in the middle", whole[..whole.len() - 5].to_vec()),
        ("damaged checksum", {
            let mut v = whole.clone();
            *v.last_mut().unwrap() ^= 0xff;
            v
        }),
        ("huge length", {
            let mut v = whole.clone();
            v.extend_from_slice(&u32::MAX.to_le_bytes());
            v.extend_from_slice(&[0u8; 100]);
            v
        }),
    ] {
        let (_c, copy) = crash_copy(&db);
        let s = segments(&copy).unwrap().pop().unwrap().1;
        std::fs::write(&s, &bytes).unwrap();
        let b2 = LeaseBook::open_folding_every(&copy, HOUR).unwrap();
        assert_eq!(b2.get(&x.mac), Some(x.clone()), "{what}");
        let want_y = what == "huge length";
        assert_eq!(b2.get(&y.mac).is_some(), want_y, "{what}");
    }

    // A file that is not a segment at all is an error, not silently skipped.
    let (_c, copy) = crash_copy(&db);
    let s = segments(&copy).unwrap().pop().unwrap().1;
    std::fs::write(&s, b"not a journal").unwrap();
    let e = LeaseBook::open_folding_every(&copy, HOUR).unwrap_err();
    assert!(
        format!("{e:#}").contains("not a lease journal segment"),
        "{e:#}"
    );
}

#[test]
fn one_book_per_inventory() {
    let (_d, db) = inventory();
    let inv = Inventory::open(&db).unwrap();
    let b = inv.lease_book().unwrap();
    // The same process asking again shares it...
    assert!(Arc::ptr_eq(&b, &inv.lease_book().unwrap()));
    // ...another keeper is refused with a reason.
    let e = Inventory::open(&db).unwrap().lease_book().unwrap_err();
    assert!(
        format!("{e:#}").contains("one DHCP server per inventory"),
        "{e:#}"
    );
    drop(b);
    drop(inv);
    Inventory::open(&db).unwrap().lease_book().unwrap();
}

#[test]
fn a_failed_append_undoes_the_changes_and_loses_nothing() {
    let (_d, db) = inventory();
    let b = LeaseBook::open_folding_every(&db, HOUR).unwrap();
    let x = lease("aa:00:00:00:00:01", "10.213.100.1");
    b.put(x.clone()).unwrap();
    b.commit().unwrap();

    b.break_journal();
    // x moves, y takes x's old address: both undone when the append fails.
    b.put(lease(&x.mac, "10.213.100.7")).unwrap();
    b.put(lease("bb:00:00:00:00:02", "10.213.100.1")).unwrap();
    let e = b.commit().unwrap_err();
    assert!(format!("{e:#}").contains("lease journal"), "{e:#}");
    assert_eq!(b.get(&x.mac), Some(x.clone()));
    assert_eq!(b.get("bb:00:00:00:00:02"), None);
    assert!(b.held_by_other(x.ip, "bb:00:00:00:00:02", now()));
    assert!(!b.held_by_other("10.213.100.7".parse().unwrap(), "bb:00:00:00:00:02", now()));

    // The book went on to a new segment: the next commit works, and a restart finds both.
    let z = lease("cc:00:00:00:00:03", "10.213.100.3");
    b.put(z.clone()).unwrap();
    b.commit().unwrap();
    let (_c, copy) = crash_copy(&db);
    let b2 = LeaseBook::open_folding_every(&copy, HOUR).unwrap();
    assert_eq!(b2.get(&x.mac), Some(x.clone()));
    assert_eq!(b2.get(&z.mac), Some(z.clone()));
    assert_eq!(b2.get("bb:00:00:00:00:02"), None);
    // And the fold of the original removes every segment it covered.
    b.flush().unwrap();
    assert_eq!(table(&db), vec![x, z]);
    assert_eq!(segments(&db).unwrap().len(), 1);
}

#[test]
fn the_fold_thread_folds_and_a_drop_folds_the_rest() {
    let (_d, db) = inventory();
    let b = LeaseBook::open_folding_every(&db, Duration::from_millis(20)).unwrap();
    let x = lease("aa:00:00:00:00:01", "10.213.100.1");
    b.put(x.clone()).unwrap();
    b.commit().unwrap();
    let t = std::time::Instant::now();
    while table(&db).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "never folded");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(table(&db), vec![x.clone()]);

    let b = {
        drop(b);
        LeaseBook::open_folding_every(&db, HOUR).unwrap()
    };
    let y = lease("aa:00:00:00:00:02", "10.213.100.2");
    b.put(y.clone()).unwrap();
    b.commit().unwrap();
    drop(b);
    assert_eq!(table(&db), vec![x, y]);
    assert!(segments(&db).unwrap().is_empty());
}
