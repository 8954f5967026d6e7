//! Code transforms applied to plugin source before it runs (TypeScript, ES modules, CommonJS).
