//! Plugins: loading (archive, source, local folder, plugin.json), code transforms, the sandboxed
//! JavaScript runtime on a fixed pool of worker threads (one VM per plugin config per thread), the
//! meta API, and the method runners (processEvent, onEvent, onSnapshot, exportEvents, scheduled
//! tasks, jobs).

pub mod runtime;
pub mod transform;
