//! Pinned maps across builds: a map pinned by a build whose layout
//! differs (another capacity, another value size, another type) is
//! replaced at load instead of being reused under the new programs; maps
//! of this build's shape are reused. Root and bpffs; no network.

use flannel_agent::datapath::ebpf::{
    self, object_shapes, pinned_shape, replace_incompatible_pins, wanted_shapes, Datapath, OBJECT,
};
use flannel_common::maps;

/// A pin directory unique to this run, removed however the test ends.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = ebpf::remove_pins(&self.0);
    }
}

#[test]
fn pinned_maps_of_another_shape_are_replaced_and_the_rest_reused() {
    let dir = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        flannel_tests::lab::unique_id()
    )));
    for name in maps::ALL {
        assert!(
            object_shapes(OBJECT).unwrap().contains_key(name),
            "the object declares no {name}"
        );
    }
    // A /16 of /24 leases: 256 lease slots.
    let want = wanted_shapes(OBJECT, 256).unwrap();
    assert_eq!(want[maps::LEASE_SLOTS].max_entries, 256);

    // A first load pins every map in this build's shape...
    drop(Datapath::load(&dir.0, 256).unwrap());
    for name in maps::ALL {
        let path = dir.0.join("maps").join(name);
        assert_eq!(pinned_shape(&path).as_ref(), want.get(name), "{name}");
    }
    // ...and a second finds nothing to replace (no false mismatch, which
    // would wipe the maps at every restart).
    assert!(replace_incompatible_pins(&dir.0, OBJECT, 256)
        .unwrap()
        .is_empty());

    // An older build's counters: a map of another shape pinned under the
    // counters' name (the VTEP hash map stands in for it).
    let counters = dir.0.join("maps").join(maps::COUNTERS);
    std::fs::remove_file(&counters).unwrap();
    std::fs::rename(dir.0.join("maps").join(maps::VTEPS), &counters).unwrap();
    assert_ne!(pinned_shape(&counters).as_ref(), want.get(maps::COUNTERS));
    // The VTEP map is gone too: nothing pinned, nothing to replace there.
    assert_eq!(
        replace_incompatible_pins(&dir.0, OBJECT, 256).unwrap(),
        vec![maps::COUNTERS.to_string()]
    );
    assert!(!counters.exists());

    // A load over the old pins puts this build's maps in their place.
    std::fs::rename(
        dir.0.join("maps").join(maps::ENDPOINTS),
        dir.0.join("maps").join(maps::COUNTERS),
    )
    .unwrap();
    drop(Datapath::load(&dir.0, 256).unwrap());
    for name in maps::ALL {
        let path = dir.0.join("maps").join(name);
        assert_eq!(pinned_shape(&path).as_ref(), want.get(name), "{name}");
    }

    // A network of another size (a /14 of /24s) gets lease slots of its
    // size; nothing else is replaced.
    assert_eq!(
        replace_incompatible_pins(&dir.0, OBJECT, 1024).unwrap(),
        vec![maps::LEASE_SLOTS.to_string()]
    );
    drop(Datapath::load(&dir.0, 1024).unwrap());
    let slots = pinned_shape(&dir.0.join("maps").join(maps::LEASE_SLOTS)).unwrap();
    assert_eq!(slots.max_entries, 1024);
    // Too many slots for the map (0): one unused slot, not an empty array.
    drop(Datapath::load(&dir.0, 0).unwrap());
    let slots = pinned_shape(&dir.0.join("maps").join(maps::LEASE_SLOTS)).unwrap();
    assert_eq!(slots.max_entries, 1);
}
