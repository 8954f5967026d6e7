//! Facade modules: the libraries plugins import that are neither built into the sandbox's prelude
//! nor pure data (`pg`, `generic-pool`, `stream`, `faker`, ... and their helpers), each a
//! JavaScript file of this folder evaluated *lazily* in a VM, the first time plugin code (or
//! another facade) requires it, so VMs of plugins that do not import it pay nothing for it.
//!
//! Owns: the table of facades ([`FACADES`]: name, source, whether plugin code may import it
//! directly) and the calling convention every engine follows. A facade file is one function
//! expression `(function (internals) { ...; return exports })`: the engine compiles it under the
//! file name `facade:<name>` (so its frames are never mistaken for plugin code) and hands the
//! function to the loader (`loader.js`, compiled on the first require of any facade), which calls
//! it once with the internals (`hostCall`, the async host op counted against the VM's in-flight
//! cap; `Buffer`; `require` for other modules and facades; timers over the host's sleep; error
//! helpers) and caches the exports, frozen (except `faker`'s object, whose state plugins set:
//! `faker.locale`, `faker.seed`). An engine provides one host function to the prelude:
//! `host.facade()` lists [`FACADES`] as `[[name, importable], ...]`, and `host.facade(name)` is the
//! compiled function of [`find`]`(name)` (`@loader` included). A VM whose plugin imports no facade
//! pays only for the prelude's few lines that define the importable names (measured with
//! `cargo bench --profile dev --bench vm_worker`: see the README).
//!
//! Not here: the host side of the facades (extensions), the allow-list rule (`transform`).

/// One facade module.
#[derive(Debug, Clone, Copy)]
pub struct Facade {
    /// The module name as plugin code imports it (`pg`) or facades require it (`events`).
    pub name: &'static str,
    /// The function expression, see the module docs.
    pub source: &'static str,
    /// Plugin code may import it (the reference's `imports.ts` lists it); otherwise it exists
    /// only for other facades (`events`), and an import from plugin code fails
    /// with the reference's "Cannot import" message.
    pub importable: bool,
}

/// Every facade.
pub const FACADES: &[Facade] = &[
    Facade { name: "events", source: include_str!("events.js"), importable: false },
    Facade { name: "stream", source: include_str!("stream.js"), importable: true },
    Facade { name: "generic-pool", source: include_str!("generic-pool.js"), importable: true },
    Facade { name: "pg", source: include_str!("pg.js"), importable: true },
    Facade { name: "aws-sdk", source: include_str!("aws-sdk.js"), importable: true },
    Facade { name: "@google-cloud/common", source: include_str!("google-common.js"), importable: false },
    Facade { name: "@google-cloud/bigquery", source: include_str!("bigquery.js"), importable: true },
    Facade { name: "@google-cloud/storage", source: include_str!("storage.js"), importable: true },
    Facade { name: "@google-cloud/pubsub", source: include_str!("pubsub.js"), importable: true },
    Facade { name: "faker", source: include_str!("faker.js"), importable: true },
    Facade { name: "snowflake-sdk", source: include_str!("snowflake-sdk.js"), importable: true },
];

/// The loader the prelude compiles on the first require of a facade (`modules/loader.js`): it
/// holds the prelude's private pieces and gives each facade its internals.
pub const LOADER: Facade = Facade { name: "@loader", source: include_str!("loader.js"), importable: false };

/// The facade called `name` (or the loader, `@loader`).
pub fn find(name: &str) -> Option<&'static Facade> {
    if name == LOADER.name {
        return Some(&LOADER);
    }
    FACADES.iter().find(|facade| facade.name == name)
}

/// Whether plugin code may import facade `name`.
pub fn is_importable(name: &str) -> bool {
    find(name).is_some_and(|facade| facade.importable)
}

/// The file name an engine compiles facade `name` under.
pub fn file_name(name: &str) -> String {
    format!("facade:{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_facade_is_one_function_expression() {
        for facade in FACADES.iter().chain([&LOADER]) {
            let code: String = facade
                .source
                .lines()
                .filter(|line| !line.trim_start().starts_with("//") && !line.trim().is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            assert!(code.starts_with("(function"), "{} starts with its function", facade.name);
            assert!(code.trim_end().ends_with("})"), "{} ends with its function", facade.name);
        }
        assert!(
            is_importable("pg")
                && is_importable("generic-pool")
                && is_importable("stream")
                && is_importable("@google-cloud/bigquery")
                && is_importable("@google-cloud/storage")
                && is_importable("@google-cloud/pubsub")
                && is_importable("faker")
                && is_importable("snowflake-sdk")
                && !is_importable("@google-cloud/common")
                && !is_importable("events")
                && !is_importable("fs")
        );
    }
}
