//! Which system package provides each dependency, and the command that installs them.

use super::Dependency;

/// The package managers the README's commands know how to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manager {
    Apt,
    Brew,
}

impl Manager {
    pub fn detect() -> Option<Manager> {
        let on_path = |p: &str| super::which(p).is_some();
        if cfg!(target_os = "macos") && on_path("brew") {
            Some(Manager::Brew)
        } else if on_path("apt-get") {
            Some(Manager::Apt)
        } else {
            None
        }
    }

    pub fn package(self, dep: Dependency) -> &'static str {
        match (self, dep) {
            // libclang-dev pulls in the versioned C library (libclang1-N) and clang's resource
            // headers, which bindgen needs to parse stddef.h and friends.
            (Manager::Apt, Dependency::Libclang) => "libclang-dev",
            (Manager::Brew, Dependency::Libclang) => "llvm",
            (_, dep) => dep.name(),
        }
    }
}

/// What to run to install `missing`, as a list of command lines (argv each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallPlan {
    pub commands: Vec<Vec<String>>,
}

impl InstallPlan {
    pub fn new(manager: Manager, missing: &[Dependency], root: bool) -> InstallPlan {
        let packages: Vec<String> = missing.iter().map(|d| manager.package(*d).to_string()).collect();
        let sudo: Vec<String> = if root || manager == Manager::Brew { vec![] } else { vec!["sudo".into()] };
        let with_sudo = |args: &[&str]| -> Vec<String> { sudo.iter().cloned().chain(args.iter().map(|a| a.to_string())).collect() };
        let commands = match manager {
            Manager::Apt => {
                let mut install = with_sudo(&["apt-get", "install", "-y", "--no-install-recommends"]);
                install.extend(packages);
                vec![with_sudo(&["apt-get", "update", "-q"]), install]
            }
            Manager::Brew => vec![["brew", "install"].iter().map(|a| a.to_string()).chain(packages).collect()],
        };
        InstallPlan { commands }
    }

    /// The plan as one shell line, for the message that tells the user what to run.
    pub fn shell_line(&self) -> String {
        self.commands.iter().map(|c| c.join(" ")).collect::<Vec<_>>().join(" && ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_installs_the_c_library_of_libclang_with_sudo_unless_root() {
        let plan = InstallPlan::new(Manager::Apt, &[Dependency::Cmake, Dependency::Libclang], false);
        assert_eq!(plan.shell_line(), "sudo apt-get update -q && sudo apt-get install -y --no-install-recommends cmake libclang-dev");
        let root = InstallPlan::new(Manager::Apt, &[Dependency::Libclang], true);
        assert_eq!(root.commands[1].first().map(String::as_str), Some("apt-get"));
        assert!(root.commands[1].contains(&"libclang-dev".to_string()));
    }

    #[test]
    fn brew_installs_llvm_for_libclang_without_sudo() {
        let plan = InstallPlan::new(Manager::Brew, &[Dependency::Libclang, Dependency::Ccache], false);
        assert_eq!(plan.commands, vec![vec!["brew".to_string(), "install".into(), "llvm".into(), "ccache".into()]]);
    }
}
