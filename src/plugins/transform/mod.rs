//! Code transforms applied to plugin source before it runs (reference 30 §4): TypeScript stripping,
//! module-style detection (ES module vs. CommonJS/plain script) and the import allow-list check.
//!
//! Owns: parsing plugin code (oxc), the `/index.ts: ` error prefix, the "Cannot import" rule for
//! `import`/`export ... from`/`require('<m>')`. Plain JavaScript is passed through byte for byte
//! so that error positions (`line L:C` in timeout messages, stack traces) point into the plugin's
//! own source; only code with TypeScript syntax is re-printed.
//!
//! Does not own: running the code, the module objects behind the allowed imports, or the loop and
//! promise timeouts — QuickJS runs ES2020+ natively and the runtime enforces deadlines with its
//! interrupt handler instead of injected guards (same messages, see `plugins::runtime`).

use std::path::Path;

use oxc::allocator::Allocator;
use oxc::ast::ast::{
    Argument, ArrowFunctionExpression, CallExpression, DoWhileStatement, Expression, ForStatement, Function,
    ImportDeclarationSpecifier, Statement, WhileStatement,
};
use oxc::ast_visit::{walk, Visit};
use oxc::codegen::Codegen;
use oxc::diagnostics::OxcDiagnostic;
use oxc::parser::Parser;
use oxc::semantic::SemanticBuilder;
use oxc::span::{GetSpan, SourceType, Span};
use oxc::syntax::scope::ScopeFlags;
use oxc::transformer::{TransformOptions, Transformer};

/// The virtual file name of every plugin (the reference transforms as `index.ts`).
pub const VIRTUAL_FILENAME: &str = "index.ts";

/// Plugin code ready to run.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformedCode {
    /// JavaScript (ES2020+) to evaluate.
    pub code: String,
    /// The code uses `import`/`export`: evaluate it as an ES module; otherwise as a script
    /// (CommonJS style `module.exports`, or plain global functions).
    pub is_module: bool,
    /// Every module named by an `import`/re-export/`require('<m>')` (all allowed).
    pub imports: Vec<String>,
}

/// Why plugin code cannot run; the message matches the reference's `/index.ts: …` form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("/{VIRTUAL_FILENAME}: {message}")]
pub struct TransformError {
    pub message: String,
}

/// The message for an import outside the allow-list (reference wording).
pub fn forbidden_import_message(module: &str) -> String {
    format!("Cannot import '{module}'! This package is not provided by PostHog in plugins.")
}

/// Parses, checks imports against `is_allowed`, and strips TypeScript.
pub fn transform_code(source: &str, is_allowed: &dyn Fn(&str) -> bool) -> Result<TransformedCode, TransformError> {
    let allocator = Allocator::default();
    // Babel parses plugin code as a TypeScript module; so do we (strict mode, import/export allowed).
    let parsed = Parser::new(&allocator, source, SourceType::ts()).parse();
    if let Some(error) = parsed.diagnostics.errors().next() {
        return Err(diagnostic_error(source, error));
    }
    if parsed.panicked {
        return Err(TransformError { message: "Unexpected token".to_string() });
    }
    let is_module = parsed.module_record.has_module_syntax;

    // Babel's TypeScript preset (the reference transforms every plugin as `index.ts`) drops
    // `import type` and every import whose bindings are used only in types or not at all, before
    // its import check runs: those never reach the allow-list.
    let program = parsed.program;
    let semantic = SemanticBuilder::new().with_excess_capacity(2.0).build(&program);
    if let Some(error) = semantic.diagnostics.errors().next() {
        return Err(diagnostic_error(source, error));
    }
    let scoping = semantic.semantic.into_scoping();
    let elided = elided_imports(&program, &scoping);
    let mut imports: Vec<String> = Vec::new();
    for statement in &program.body {
        match statement {
            Statement::ImportDeclaration(declaration) if !elided.contains(&declaration.span) => {
                push_unique(&mut imports, declaration.source.value.as_str())
            }
            Statement::ExportFromDeclaration(declaration) if !declaration.export_kind.is_type() => {
                push_unique(&mut imports, declaration.source.value.as_str())
            }
            Statement::ExportAllDeclaration(declaration) if !declaration.export_kind.is_type() => {
                push_unique(&mut imports, declaration.source.value.as_str())
            }
            _ => {}
        }
    }
    let mut requires = RequireCollector::default();
    requires.visit_program(&program);
    for name in requires.modules {
        push_unique(&mut imports, &name);
    }
    // Report in source order like the reference, which fails on the first offending statement.
    imports.sort_by_key(|m| source.find(&format!("'{m}'")).or_else(|| source.find(&format!("\"{m}\""))));
    if let Some(bad) = imports.iter().find(|m| !is_allowed(m)) {
        return Err(TransformError { message: forbidden_import_message(bad) });
    }

    // Plain JavaScript runs as written (exact positions); only TypeScript is re-printed.
    let js_allocator = Allocator::default();
    let as_js = Parser::new(&js_allocator, source, SourceType::mjs()).parse();
    if !as_js.panicked && as_js.diagnostics.errors().next().is_none() {
        drop(as_js);
        return Ok(finish(source, is_module, imports, &elided));
    }
    drop(as_js);

    let mut program = program;
    let options = TransformOptions::from_target("esnext").map_err(|message| TransformError { message })?;
    let result =
        Transformer::new(&allocator, Path::new(VIRTUAL_FILENAME), &options).build_with_scoping(scoping, &mut program);
    if let Some(error) = result.diagnostics.errors().next() {
        return Err(diagnostic_error(source, error));
    }
    // The TypeScript transform has removed the elided imports itself.
    let code = Codegen::new().build(&program).code;
    Ok(finish(&code, is_module, imports, &[]))
}

/// The spans of the top-level imports Babel's TypeScript plugin removes (its
/// `onlyRemoveTypeImports: false` rule): `import type …`, and imports with specifiers none of
/// whose bindings is used as a value (only in types, or not at all). Side-effect imports
/// (`import 'm'`) stay.
fn elided_imports(program: &oxc::ast::ast::Program<'_>, scoping: &oxc::semantic::Scoping) -> Vec<Span> {
    let mut elided = Vec::new();
    for statement in &program.body {
        let Statement::ImportDeclaration(declaration) = statement else { continue };
        if declaration.import_kind.is_type() {
            elided.push(declaration.span);
            continue;
        }
        let Some(specifiers) = declaration.specifiers.as_ref().filter(|specifiers| !specifiers.is_empty()) else {
            continue;
        };
        let used_as_value = |specifier: &ImportDeclarationSpecifier<'_>| {
            if let ImportDeclarationSpecifier::ImportSpecifier(named) = specifier {
                if named.import_kind.is_type() {
                    return false;
                }
            }
            // No symbol: keep the import (Babel keeps imports it has no binding for).
            specifier.local().symbol_id.get().is_none_or(|symbol| {
                scoping.get_resolved_references(symbol).any(|reference| reference.flags().is_value())
            })
        };
        if !specifiers.iter().any(used_as_value) {
            elided.push(declaration.span);
        }
    }
    elided
}

/// Binds imports the way the reference's transform does (a named import is a property of the
/// module object, `undefined` when missing; default and namespace imports are the whole module
/// object) by replacing each `import` with constants, keeping line numbers. Code that still
/// exports runs as an ES module; code that only imported runs as a script, like the reference's
/// CommonJS output, so its top-level functions are globals.
fn finish(code: &str, had_module_syntax: bool, imports: Vec<String>, elided: &[Span]) -> TransformedCode {
    if !had_module_syntax {
        return TransformedCode { code: code.to_string(), is_module: false, imports };
    }
    let allocator = Allocator::default();
    let parsed = Parser::new(&allocator, code, SourceType::mjs()).parse();
    let mut edits: Vec<(Span, String)> = Vec::new();
    let mut has_exports = false;
    for statement in &parsed.program.body {
        match statement {
            Statement::ImportDeclaration(declaration) if elided.contains(&declaration.span) => {
                let original = code.get(declaration.span.start as usize..declaration.span.end as usize).unwrap_or("");
                edits.push((declaration.span, "\n".repeat(original.matches('\n').count())));
            }
            Statement::ImportDeclaration(declaration) => {
                let host = format!("__pluginHostImports[{}]", json_string(declaration.source.value.as_str()));
                let mut constants = Vec::new();
                let mut named = Vec::new();
                for specifier in declaration.specifiers.iter().flatten() {
                    match specifier {
                        ImportDeclarationSpecifier::ImportSpecifier(s) => {
                            named.push(format!("{}: {}", json_string(s.imported.name().as_str()), s.local.name))
                        }
                        ImportDeclarationSpecifier::ImportDefaultSpecifier(s) => {
                            constants.push(format!("const {} = {host};", s.local.name))
                        }
                        ImportDeclarationSpecifier::ImportNamespaceSpecifier(s) => {
                            constants.push(format!("const {} = {host};", s.local.name))
                        }
                    }
                }
                if !named.is_empty() {
                    constants.push(format!("const {{ {} }} = {host};", named.join(", ")));
                }
                let original = code.get(declaration.span.start as usize..declaration.span.end as usize).unwrap_or("");
                let replacement = constants.join(" ") + &"\n".repeat(original.matches('\n').count());
                edits.push((declaration.span, replacement));
            }
            other if other.is_module_declaration() => has_exports = true,
            _ => {}
        }
    }
    let mut out = code.to_string();
    for (span, replacement) in edits.into_iter().rev() {
        out.replace_range(span.start as usize..span.end as usize, &replacement);
    }
    TransformedCode { code: out, is_module: has_exports, imports }
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| format!("{text:?}"))
}

fn push_unique(list: &mut Vec<String>, name: &str) {
    if !list.iter().any(|m| m == name) {
        list.push(name.to_string());
    }
}

/// `message (line:column)` like Babel's errors (1-based line, 0-based column).
fn diagnostic_error(source: &str, error: &OxcDiagnostic) -> TransformError {
    let position = error.labels.first().map(|label| line_column(source, label.offset() as usize));
    let message = match position {
        Some((line, column)) => format!("{} ({line}:{column})", error.message),
        None => error.message.to_string(),
    };
    TransformError { message }
}

/// 1-based line and 0-based column (in UTF-16 units, like JS engines) of a byte offset.
pub fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before.get(line_start..).map(|s| s.encode_utf16().count()).unwrap_or(0);
    (line, column)
}

/// The start (1-based line, 0-based column) of the `while`/`do…while`/`for` loop that was
/// running when the engine interrupted plugin code at `line:column` — the reference names that
/// loop in its timeout message (30 §4b). QuickJS reports the last position it recorded, which
/// may precede the loop (e.g. the function start), so: the innermost loop of that function
/// containing the position, else the first loop inside the function starting after it, else the
/// last one before it.
pub fn enclosing_loop_start(code: &str, line: u32, column: u32) -> Option<(u32, u32)> {
    let mut offset = byte_offset(code, line, column)?;
    // A position in indentation belongs to the statement that follows it.
    offset += code.get(offset..)?.len() - code.get(offset..)?.trim_start().len();
    let offset = offset as u32;
    let allocator = Allocator::default();
    let parsed = Parser::new(&allocator, code, SourceType::mjs()).parse();
    let program_span = parsed.program.span;
    let mut finder = LoopFinder { functions: vec![program_span], all_functions: vec![program_span], loops: Vec::new() };
    finder.visit_program(&parsed.program);
    let innermost = |spans: &mut dyn Iterator<Item = Span>| {
        spans.filter(|s| s.start <= offset && offset <= s.end).min_by_key(|s| s.size())
    };
    let function = innermost(&mut finder.all_functions.iter().copied())?;
    let own = finder.loops.iter().filter(|(_, f)| *f == function).map(|(l, _)| *l);
    // Loops anywhere inside that function, e.g. in a callback it passed to `.then()`.
    let mut inside: Vec<Span> =
        finder.loops.iter().map(|(l, _)| *l).filter(|l| function.start <= l.start && l.end <= function.end).collect();
    inside.sort_by_key(|s| s.start);
    let chosen = innermost(&mut own.into_iter())
        .or_else(|| inside.iter().copied().find(|s| s.start >= offset))
        .or_else(|| inside.last().copied())?;
    let (l, c) = line_column(code, chosen.start as usize);
    Some((l as u32, c as u32))
}

/// Byte offset of a 1-based line and 0-based UTF-16 column.
fn byte_offset(code: &str, line: u32, column: u32) -> Option<usize> {
    let mut start = 0usize;
    for _ in 1..line.max(1) {
        start += code.get(start..)?.find('\n')? + 1;
    }
    let rest = code.get(start..)?;
    let mut units = 0u32;
    for (i, ch) in rest.char_indices() {
        if units >= column || ch == '\n' {
            return Some(start + i);
        }
        units += ch.len_utf16() as u32;
    }
    Some(start + rest.len())
}

/// Loops with the span of their innermost enclosing function (or the program).
struct LoopFinder {
    functions: Vec<Span>,
    all_functions: Vec<Span>,
    loops: Vec<(Span, Span)>,
}

impl LoopFinder {
    fn add_loop(&mut self, span: Span) {
        let function = self.functions.last().copied().unwrap_or(span);
        self.loops.push((span, function));
    }
    fn enter_function(&mut self, span: Span) {
        self.functions.push(span);
        self.all_functions.push(span);
    }
}

impl<'a> Visit<'a> for LoopFinder {
    fn visit_while_statement(&mut self, it: &WhileStatement<'a>) {
        self.add_loop(it.span());
        walk::walk_while_statement(self, it);
    }
    fn visit_do_while_statement(&mut self, it: &DoWhileStatement<'a>) {
        self.add_loop(it.span());
        walk::walk_do_while_statement(self, it);
    }
    fn visit_for_statement(&mut self, it: &ForStatement<'a>) {
        self.add_loop(it.span());
        walk::walk_for_statement(self, it);
    }
    fn visit_function(&mut self, it: &Function<'a>, flags: ScopeFlags) {
        self.enter_function(it.span());
        walk::walk_function(self, it, flags);
        self.functions.pop();
    }
    fn visit_arrow_function_expression(&mut self, it: &ArrowFunctionExpression<'a>) {
        self.enter_function(it.span());
        walk::walk_arrow_function_expression(self, it);
        self.functions.pop();
    }
}

/// Collects `require('<literal>')` calls with exactly one argument.
#[derive(Default)]
struct RequireCollector {
    modules: Vec<String>,
}

impl<'a> Visit<'a> for RequireCollector {
    fn visit_call_expression(&mut self, call: &CallExpression<'a>) {
        if let Expression::Identifier(callee) = &call.callee {
            if callee.name == "require" && call.arguments.len() == 1 {
                if let Some(Argument::StringLiteral(literal)) = call.arguments.first() {
                    self.modules.push(literal.value.to_string());
                }
            }
        }
        walk::walk_call_expression(self, call);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(m: &str) -> bool {
        matches!(m, "node-fetch" | "crypto" | "url")
    }

    #[test]
    fn plain_js_passes_through_unchanged() {
        let src = "\nfunction processEvent(event) {\n    while (1) {}\n}\n";
        let out = transform_code(src, &allow).unwrap();
        assert_eq!(out.code, src);
        assert!(!out.is_module);
    }

    #[test]
    fn typescript_is_stripped() {
        let src = "interface A { x: number }\nexport function processEvent(event: A, { config }: any): A {\n  return event as A\n}\n";
        let out = transform_code(src, &allow).unwrap();
        assert!(out.is_module);
        assert!(!out.code.contains("interface"), "{}", out.code);
        assert!(!out.code.contains(": A"), "{}", out.code);
        assert!(out.code.contains("export function processEvent"), "{}", out.code);
    }

    #[test]
    fn forbidden_imports_and_requires() {
        let err = transform_code("import { kea } from 'kea'\nkea()\n", &allow).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/index.ts: Cannot import 'kea'! This package is not provided by PostHog in plugins."
        );
        let err = transform_code("const kea = require('kea')\n", &allow).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/index.ts: Cannot import 'kea'! This package is not provided by PostHog in plugins."
        );
        let ok =
            transform_code("import fetch from 'node-fetch'\nconst c = require('crypto')\nfetch(c)\n", &allow).unwrap();
        assert_eq!(ok.imports, vec!["node-fetch".to_string(), "crypto".to_string()]);
        assert!(!ok.is_module);
        assert_eq!(
            ok.code,
            "const fetch = __pluginHostImports[\"node-fetch\"];\nconst c = require('crypto')\nfetch(c)\n"
        );
        let named =
            transform_code("import { bla, bla3 as bla4 } from 'node-fetch'\nexport const x = [bla, bla4]", &allow)
                .unwrap();
        assert!(named.is_module);
        assert_eq!(
            named.code,
            "const { \"bla\": bla, \"bla3\": bla4 } = __pluginHostImports[\"node-fetch\"];\nexport const x = [bla, bla4]"
        );
    }

    /// Babel 7.13's TypeScript preset (`@babel/standalone`, as the reference runs it) removes these
    /// imports before the reference's import check sees them.
    #[test]
    fn type_only_and_unused_imports_are_erased_before_the_import_check() {
        let typed = "import { PluginEvent, PluginMeta } from 'posthog-plugins'\n\
                     export function processEvent(event: PluginEvent, meta: PluginMeta): PluginEvent {\n  return event\n}\n";
        let out = transform_code(typed, &allow).unwrap();
        assert!(out.imports.is_empty(), "{:?}", out.imports);
        assert!(!out.code.contains("posthog-plugins"), "{}", out.code);
        assert!(out.is_module);

        let type_import = "import type { Plugin } from '@posthog/plugin-scaffold-types'\nconst x: Plugin = {}\n";
        assert!(transform_code(type_import, &allow).unwrap().imports.is_empty());
        // `typeof X` in a type is a type use too.
        let type_query = "import { thing } from 'not-provided'\nlet y: typeof thing\n";
        assert!(transform_code(type_query, &allow).unwrap().imports.is_empty());
        // Unused imports go too, even in plain JavaScript, which still runs as written otherwise
        // (the erased line stays a blank line).
        let unused = "import { kea } from 'kea'\nfunction processEvent(event) { return event }\n";
        let out = transform_code(unused, &allow).unwrap();
        assert_eq!(out.code, "\nfunction processEvent(event) { return event }\n");
        assert!(!out.is_module);

        // Mixed: a binding used as a value keeps the import, and the check applies.
        let mixed =
            "import { PluginEvent, kea } from 'kea'\nexport function processEvent(e: PluginEvent) { return kea(e) }\n";
        let err = transform_code(mixed, &allow).unwrap_err();
        assert_eq!(err.message, forbidden_import_message("kea"));
        let allowed_mixed = "import fetch, { Response } from 'node-fetch'\nexport async function f(): Promise<Response> { return fetch('x') }\n";
        let out = transform_code(allowed_mixed, &allow).unwrap();
        assert_eq!(out.imports, vec!["node-fetch".to_string()]);
        assert!(out.code.contains("__pluginHostImports[\"node-fetch\"]"), "{}", out.code);
        // Side-effect imports are kept, so checked.
        assert!(transform_code("import 'kea'\n", &allow).is_err());
        // A value use anywhere (here a re-export) keeps it.
        assert!(transform_code("import { kea } from 'kea'\nexport { kea }\n", &allow).is_err());
    }

    #[test]
    fn syntax_errors_are_prefixed() {
        let err = transform_code("function f(a b) {}", &allow).unwrap_err();
        assert!(err.to_string().starts_with("/index.ts: "), "{err}");
        assert!(err.to_string().contains("(1:"), "{err}");
    }
}
