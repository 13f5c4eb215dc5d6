//! Kernel module dependency resolution from `modules.dep`, so that the lab's initramfs
//! carries exactly the modules it needs, in an order `insmod` can load them.

use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};

/// The canonical module name of a path in `modules.dep` (`kernel/fs/9p/9p.ko.xz` -> `9p`).
pub fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    Module,
    BuiltIn,
    Absent,
}

/// What a kernel's `modules.dep` and `modules.builtin` say about its modules.
pub struct ModuleIndex {
    /// module name -> (path relative to the modules dir, direct dependencies' paths)
    deps: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> Result<Self> {
        let mut deps = HashMap::new();
        for (n, line) in modules_dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (path, rest) =
                line.split_once(':').with_context(|| format!("modules.dep line {}: expected `path: deps`, got {line:?}", n + 1))?;
            let path = path.trim().to_string();
            let list = rest.split_whitespace().map(str::to_string).collect();
            deps.insert(module_name(&path), (path, list));
        }
        let builtin = modules_builtin.lines().filter(|l| !l.trim().is_empty()).map(module_name).collect();
        Ok(Self { deps, builtin })
    }

    /// Whether `name` is a loadable module, built into the kernel, or neither.
    pub fn availability(&self, name: &str) -> Availability {
        let name = name.replace('-', "_");
        if self.deps.contains_key(&name) {
            Availability::Module
        } else if self.builtin.contains(&name) {
            Availability::BuiltIn
        } else {
            Availability::Absent
        }
    }

    /// A module's path relative to the modules dir and its dependencies' paths, as
    /// `modules.dep` lists them (depmod lists every module it needs, transitively).
    pub fn entry(&self, name: &str) -> Option<(&str, &[String])> {
        self.deps.get(&name.replace('-', "_")).map(|(path, deps)| (path.as_str(), deps.as_slice()))
    }

    /// Paths of `wanted` and everything they depend on, dependencies first.
    /// Built-in modules are skipped; a module that is neither a module nor built in is
    /// an error, because the image would silently lack a driver.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<String>> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for name in wanted {
            self.visit(&name.replace('-', "_"), &mut done, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(&self, name: &str, done: &mut HashSet<String>, stack: &mut Vec<String>, order: &mut Vec<String>) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            bail!("module dependency cycle: {} -> {name}", stack.join(" -> "));
        }
        let Some((path, deps)) = self.deps.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_string());
                return Ok(());
            }
            bail!("kernel module {name:?} is neither in modules.dep nor built in");
        };
        stack.push(name.to_string());
        for dep in deps {
            self.visit(&module_name(dep), done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_string());
        order.push(path.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko kernel/fs/fscache/fscache.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/net/ethernet/intel/igb/igb.ko: kernel/drivers/dca/dca-x.ko
kernel/drivers/dca/dca-x.ko:
";
    const BUILTIN: &str = "kernel/drivers/virtio/virtio_pci.ko\n";

    fn names(paths: &[String]) -> Vec<String> {
        paths.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let idx = ModuleIndex::parse(DEP, BUILTIN).unwrap();
        let order = names(&idx.load_order(&["9p", "9pnet_virtio"]).unwrap());
        assert_eq!(order, ["9pnet", "netfs", "fscache", "9p", "virtio_ring", "9pnet_virtio"]);
    }

    #[test]
    fn dashes_and_compressed_suffixes_normalise() {
        assert_eq!(module_name("kernel/drivers/virtio/virtio_ring.ko.xz"), "virtio_ring");
        let idx = ModuleIndex::parse(DEP, BUILTIN).unwrap();
        assert_eq!(names(&idx.load_order(&["igb"]).unwrap()), ["dca_x", "igb"]);
    }

    #[test]
    fn builtin_is_skipped_and_unknown_is_an_error() {
        let idx = ModuleIndex::parse(DEP, BUILTIN).unwrap();
        assert!(idx.load_order(&["virtio_pci"]).unwrap().is_empty());
        assert_eq!(idx.availability("virtio_pci"), Availability::BuiltIn);
        assert_eq!(idx.availability("dca-x"), Availability::Module);
        assert_eq!(idx.availability("no_such_driver"), Availability::Absent);
        let err = idx.load_order(&["no_such_driver"]).unwrap_err().to_string();
        assert!(err.contains("no_such_driver"), "{err}");
    }

    #[test]
    fn entries_give_path_and_dependency_paths() {
        let idx = ModuleIndex::parse(DEP, BUILTIN).unwrap();
        let (path, deps) = idx.entry("dca-x").unwrap();
        assert_eq!((path, deps), ("kernel/drivers/dca/dca-x.ko", &[][..]));
        assert_eq!(idx.entry("igb").unwrap().1, ["kernel/drivers/dca/dca-x.ko"]);
        assert!(idx.entry("virtio_pci").is_none(), "built in");
    }

    #[test]
    fn malformed_and_cyclic_input_is_rejected() {
        assert!(ModuleIndex::parse("no colon here\n", "").is_err());
        let idx = ModuleIndex::parse("a.ko: b.ko\nb.ko: a.ko\n", "").unwrap();
        assert!(idx.load_order(&["a"]).unwrap_err().to_string().contains("cycle"));
    }
}
