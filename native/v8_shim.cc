// A thin C ABI over V8 (Debian's libnode108: V8 10.2, ICU 72) for src/plugins/runtime/v8/.
//
// What lives here is only what needs V8's C++ API: isolates with a heap limit, realms (contexts),
// compiling and running code, calling a function, host functions, promises, and walking a JS value
// into JSON text under a budget. Policy (deadlines, which errors mean what, async host ops, the
// safe API) is in Rust; see ffi.rs for the contract of every function.
//
// Rules: nothing a plugin controls is trusted: every MaybeLocal is checked (termination or a
// throwing getter may empty it at any point), the walk of a returned value is bounded in values,
// bytes and depth, and an isolate whose heap limit was reached is only ever disposed of.

#include <libplatform/libplatform.h>
#include <v8.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

using v8::Array;
using v8::Context;
using v8::Exception;
using v8::Function;
using v8::FunctionCallbackInfo;
using v8::FunctionTemplate;
using v8::Global;
using v8::HandleScope;
using v8::Isolate;
using v8::Local;
using v8::MaybeLocal;
using v8::Module;
using v8::Object;
using v8::Promise;
using v8::ScriptCompiler;
using v8::ScriptOrigin;
using v8::String;
using v8::TryCatch;
using v8::Value;

extern "C" {

// Statuses of the operations below (mirrored in ffi.rs).
enum PstStatus : int32_t {
  PST_OK = 0,          // out: the value as JSON text
  PST_THROWN = 1,      // out: the error as JSON {name, message, stack, thrown}
  PST_PENDING = 2,     // a promise is pending: *call_id names it
  PST_TERMINATED = 3,  // execution was terminated (deadline, or the heap limit: pst_v8_oom)
  PST_REFUSED = 4,     // out: JSON {kind, claimed}: the value did not fit its budget
  PST_NOT_FOUND = 5,   // no such function
  PST_DEAD = 6,        // the isolate reached its heap limit earlier: it runs nothing more
};

// What a sync host function answers (the Rust side owns the bytes until its next reply).
struct PstReply {
  // 0: ptr/len is the result as JSON; 1: ptr/len is the error as JSON {name, message}; 2: ptr/len
  // is the result, a string of chars below U+0100 (a binary string), one byte per char (no JSON:
  // a byte would take up to 6 there).
  int32_t status;
  const char* ptr;
  size_t len;
};

struct PstCallbacks {
  void (*host_call)(void* user, uint32_t fn_id, const char* args, size_t len, PstReply* reply);
  void (*host_async)(void* user, uint32_t fn_id, uint64_t op_id, const char* args, size_t len);
  void (*console)(void* user, uint32_t level, const char* text, size_t len);
};

struct PstLimits {
  size_t max_values;
  size_t max_bytes;
  uint32_t max_depth;
  // Read values as QuickJS's conversion does (convert.rs): a getter, proxy trap or `toJSON` that
  // throws hides its member instead of failing the walk, and a BigInt becomes its decimal string.
  uint32_t lenient;
  // Nonzero: a full GC that leaves the heap 90% full ends the running call as out of memory and
  // the isolate lives on (the call's garbage is freed by the next GC); see after_full_gc.
  uint32_t gc_budget;
};
}

namespace {

// Never freed: V8 threads may still use it while the process exits.
v8::Platform* g_platform = nullptr;
std::once_flag g_init_once;

// The ArrayBuffer memory of one isolate (ArrayBuffers, typed arrays, Buffers: their bytes live
// outside the V8 heap, so the heap limit does not cover them) under a budget: an allocation that
// would take the live bytes over it answers nullptr, and V8 (after collecting garbage and trying
// again) throws `RangeError: Array buffer allocation failed` in the allocating call only. `Free`
// may run on V8's background threads (the array buffer sweeper): the count is atomic.
class BudgetAllocator : public v8::ArrayBuffer::Allocator {
 public:
  explicit BudgetAllocator(size_t budget)
      : budget_(budget), inner_(v8::ArrayBuffer::Allocator::NewDefaultAllocator()) {}
  ~BudgetAllocator() override { delete inner_; }

  void* Allocate(size_t length) override {
    if (!reserve(length)) return nullptr;
    void* data = inner_->Allocate(length);
    if (!data) release(length);
    return data;
  }

  void* AllocateUninitialized(size_t length) override {
    if (!reserve(length)) return nullptr;
    void* data = inner_->AllocateUninitialized(length);
    if (!data) release(length);
    return data;
  }

  void Free(void* data, size_t length) override {
    inner_->Free(data, length);
    release(length);
  }

  void* Reallocate(void* data, size_t old_length, size_t new_length) override {
    size_t grow = new_length > old_length ? new_length - old_length : 0;
    if (grow > 0 && !reserve(grow)) return nullptr;
    void* moved = inner_->Reallocate(data, old_length, new_length);
    if (!moved) {
      if (grow > 0) release(grow);
      return nullptr;
    }
    if (new_length < old_length) release(old_length - new_length);
    return moved;
  }

  size_t used() const { return used_.load(std::memory_order_relaxed); }
  size_t budget() const { return budget_; }
  uint64_t refused() const { return refused_.load(std::memory_order_relaxed); }

 private:
  bool reserve(size_t length) {
    size_t current = used_.load(std::memory_order_relaxed);
    do {
      if (budget_ > 0 && (length > budget_ || current > budget_ - length)) {
        refused_.fetch_add(1, std::memory_order_relaxed);
        return false;
      }
    } while (!used_.compare_exchange_weak(current, current + length, std::memory_order_relaxed));
    return true;
  }

  void release(size_t length) { used_.fetch_sub(length, std::memory_order_relaxed); }

  const size_t budget_;  // 0: no budget
  v8::ArrayBuffer::Allocator* const inner_;
  std::atomic<size_t> used_{0};
  std::atomic<uint64_t> refused_{0};
};

// V8's code cache for the server's own scripts (bootstrap.js, prelude.js, the facade modules),
// shared by every isolate of the process: each VM compiles the same ~50 KB, and consuming the
// cache skips parsing and compiling what the first VM compiled (its top level and the functions
// it ran). Keyed by file name and the source's hash and length; plugin code is never cached.
// Entries are made once and never changed (a rejected one is dropped).
struct CodeCache {
  std::mutex mu;
  std::unordered_map<std::string, std::shared_ptr<const std::vector<uint8_t>>> entries;
};

CodeCache& code_cache() {
  static CodeCache* cache = new CodeCache();  // never freed (threads may use it at exit)
  return *cache;
}

bool cacheable(const std::string& filename) {
  return filename == "prelude" || filename == "bootstrap" || filename.rfind("facade:", 0) == 0;
}

std::string cache_key(Isolate* isolate, const std::string& filename, Local<String> source) {
  String::Value chars(isolate, source);
  std::string key = filename;
  key.push_back('\0');
  if (*chars) {
    std::u16string_view view(reinterpret_cast<const char16_t*>(*chars), static_cast<size_t>(chars.length()));
    key += std::to_string(std::hash<std::u16string_view>{}(view));
  }
  key.push_back(':');
  key += std::to_string(source->Length());
  return key;
}

std::shared_ptr<const std::vector<uint8_t>> cache_find(const std::string& key) {
  CodeCache& cache = code_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  auto found = cache.entries.find(key);
  return found == cache.entries.end() ? nullptr : found->second;
}

void cache_store(const std::string& key, v8::ScriptCompiler::CachedData* data) {
  std::unique_ptr<v8::ScriptCompiler::CachedData> owned(data);
  if (!owned || owned->length <= 0) return;
  auto bytes = std::make_shared<const std::vector<uint8_t>>(owned->data, owned->data + owned->length);
  CodeCache& cache = code_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  cache.entries.emplace(key, std::move(bytes));
}

void cache_drop(const std::string& key) {
  CodeCache& cache = code_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  cache.entries.erase(key);
}

// A CachedData over a cache entry's bytes (not owned: the entry outlives the compile, held by
// `hold`).
v8::ScriptCompiler::CachedData* cached_data(const std::shared_ptr<const std::vector<uint8_t>>& bytes) {
  if (!bytes) return nullptr;
  return new v8::ScriptCompiler::CachedData(bytes->data(), static_cast<int>(bytes->size()),
                                            v8::ScriptCompiler::CachedData::BufferNotOwned);
}

struct Realm {
  Global<Context> context;
  Global<Object> exports;
};

struct HostFn {
  std::string name;
  uint32_t fn_id;
  bool is_async;
};

struct Iso;

// The data of a host function's template: which isolate and which function.
struct HostBinding {
  Iso* iso;
  uint32_t fn_id;
  bool is_async;
  std::string name;
};

struct Iso {
  Isolate* isolate = nullptr;
  BudgetAllocator* allocator = nullptr;
  std::vector<std::unique_ptr<Realm>> realms;
  std::vector<HostFn> host_fns;
  std::vector<std::unique_ptr<HostBinding>> bindings;
  std::unordered_map<uint64_t, Global<v8::Promise::Resolver>> ops;
  std::unordered_map<uint64_t, Global<Promise>> calls;
  uint64_t next_id = 1;
  void* user = nullptr;
  PstCallbacks callbacks{};
  PstLimits limits{};
  size_t stack_bytes = 0;
  size_t heap_limit = 0;
  bool oom = false;
  // Set by after_full_gc (limits.gc_budget): the running call ends as out of memory, the isolate
  // stays usable. Cleared when pst_v8_oom reports it.
  bool over_budget = false;
  bool collecting = false;
  std::string out;
  Global<String> to_json_key;
  // Promises rejected with no handler (yet): reported by pst_v8_take_rejection once the jobs ran,
  // unless a handler came later (as Node's `unhandledRejection`).
  std::vector<std::pair<Global<Promise>, Global<Value>>> rejections;
  // The import resolver of the module being instantiated by `__pst_compile` (a JS function
  // answering a module's source text), and the modules it made, by specifier.
  Global<Function> resolver;
  std::unordered_map<std::string, Global<Module>> modules;
  // The CPU deadline: set by the watchdog (any thread), read by the interrupt that records where
  // JS was (`term_stack`, `    at f (file:line:column)` lines) before it terminates.
  std::atomic<bool> terminate_wanted{false};
  std::string term_stack;
};

void forget_rejection(Iso* iso, Local<Promise> promise) {
  for (auto it = iso->rejections.begin(); it != iso->rejections.end(); ++it) {
    if (it->first.Get(iso->isolate) == promise) {
      iso->rejections.erase(it);
      return;
    }
  }
}

void on_reject(v8::PromiseRejectMessage message) {
  Local<Promise> promise = message.GetPromise();
  Isolate* isolate = promise->GetIsolate();
  Iso* iso = static_cast<Iso*>(isolate->GetData(0));
  switch (message.GetEvent()) {
    case v8::kPromiseRejectWithNoHandler:
      if (iso->rejections.size() < 1000) {
        Local<Value> value = message.GetValue();
        if (value.IsEmpty()) value = v8::Undefined(isolate);
        iso->rejections.emplace_back(Global<Promise>(isolate, promise), Global<Value>(isolate, value));
      }
      break;
    case v8::kPromiseHandlerAddedAfterReject:
      forget_rejection(iso, promise);
      break;
    default:
      break;
  }
}

size_t near_heap_limit(void* data, size_t current, size_t initial) {
  Iso* iso = static_cast<Iso*>(data);
  iso->oom = true;
  iso->isolate->TerminateExecution();
  // Room for the running code to unwind; the isolate is disposed of afterwards.
  size_t extra = initial > (64u << 20) ? initial : (64u << 20);
  return current + extra;
}

// A full GC that leaves the heap 90% full ends the call as out of memory: V8 would otherwise
// run ever slower last-resort GCs (for seconds) before the near-heap-limit callback fires.
void after_full_gc(Isolate* isolate, v8::GCType, v8::GCCallbackFlags, void* data) {
  Iso* iso = static_cast<Iso*>(data);
  if (iso->oom || iso->over_budget || iso->collecting || !iso->limits.gc_budget) return;
  v8::HeapStatistics stats;
  isolate->GetHeapStatistics(&stats);
  size_t limit = stats.heap_size_limit();
  if (iso->heap_limit > 0 && iso->heap_limit < limit) limit = iso->heap_limit;
  if (limit > 0 && stats.used_heap_size() > limit / 10 * 9) {
    iso->over_budget = true;
    isolate->TerminateExecution();
  }
}

void set_stack_limit(Iso* iso) {
  char here;
  uintptr_t sp = reinterpret_cast<uintptr_t>(&here);
  if (iso->stack_bytes > 0 && sp > iso->stack_bytes) iso->isolate->SetStackLimit(sp - iso->stack_bytes);
}

Local<String> str(Isolate* isolate, const char* data, size_t len) {
  Local<String> s;
  if (!String::NewFromUtf8(isolate, data, v8::NewStringType::kNormal, static_cast<int>(len)).ToLocal(&s)) {
    return String::Empty(isolate);
  }
  return s;
}

Local<String> str(Isolate* isolate, const std::string& s) { return str(isolate, s.data(), s.size()); }

// `p[0..n)` as a JSON string literal. With `latin1`, each byte is a Latin-1 character (a V8
// one-byte string) and is written as UTF-8; otherwise `p` is UTF-8 already. Runs of characters
// that need no escape are copied at once.
void append_escaped(std::string& out, const char* p, size_t n, bool latin1 = false) {
  out.push_back('"');
  size_t run = 0;  // start of the pending run of plain characters
  for (size_t i = 0; i < n; i++) {
    unsigned char c = static_cast<unsigned char>(p[i]);
    bool plain = c >= 0x20 && c != '"' && c != '\\' && !(latin1 && c >= 0x80);
    if (plain) continue;
    out.append(p + run, i - run);
    run = i + 1;
    switch (c) {
      case '"': out.append("\\\""); break;
      case '\\': out.append("\\\\"); break;
      case '\n': out.append("\\n"); break;
      case '\r': out.append("\\r"); break;
      case '\t': out.append("\\t"); break;
      default:
        if (c < 0x20) {
          char buf[8];
          snprintf(buf, sizeof buf, "\\u%04x", c);
          out.append(buf);
        } else {  // Latin-1 above 0x7f: two UTF-8 bytes
          out.push_back(static_cast<char>(0xC0 | (c >> 6)));
          out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
        }
    }
  }
  out.append(p + run, n - run);
  out.push_back('"');
}

// A string's UTF-8 (lone surrogates become U+FFFD).
std::string utf8(Isolate* isolate, Local<String> s) {
  int len = s->Utf8Length(isolate);
  std::string buf(static_cast<size_t>(len), '\0');
  s->WriteUtf8(isolate, buf.data(), len, nullptr, String::REPLACE_INVALID_UTF8 | String::NO_NULL_TERMINATION);
  return buf;
}

enum Refusal { REFUSED_NONE = 0, REFUSED_VALUES = 1, REFUSED_ARRAY = 2, REFUSED_BYTES = 3 };

// JS value → JSON text, as `JSON.stringify` would for plugin data (toJSON, boxed primitives,
// skipped functions/symbols/undefined members, `null` for them in arrays, non-finite numbers
// `null`, BigInt throws V8's TypeError), except that cycles and nesting deeper than the limit
// become `null`, and the walk stops with a refusal when the budget runs out.
struct Walker {
  Isolate* isolate;
  Local<Context> context;
  std::string& out;
  size_t max_values;
  size_t values_left;
  size_t bytes_left;
  uint32_t max_depth;
  Local<String> to_json_key;
  Refusal refused = REFUSED_NONE;
  double claimed = 0;
  std::vector<Local<Object>> stack;
  bool lenient = false;
  // Reused for the characters of one-byte strings.
  std::string scratch;

  // After a failed step under `tc`: true when the failure is swallowed (lenient mode, a plain
  // exception); false when it must propagate (strict mode, termination), rethrown to the caller.
  bool swallow(TryCatch& tc) {
    if (lenient && !tc.HasTerminated() && !isolate->IsExecutionTerminating()) {
      tc.Reset();
      return true;
    }
    if (tc.HasCaught() && !tc.HasTerminated()) tc.ReThrow();
    return false;
  }

  bool count_value() {
    if (values_left == 0) {
      refused = REFUSED_VALUES;
      return false;
    }
    values_left--;
    return true;
  }

  bool count_bytes(size_t n) {
    if (n > bytes_left) {
      refused = REFUSED_BYTES;
      return false;
    }
    bytes_left -= n;
    return true;
  }

  bool write_string(Local<String> s) {
    size_t length = static_cast<size_t>(s->Length());
    // Bounds first, so a huge string is refused before it is copied: at least one UTF-8 byte
    // per character, at most three.
    if (length > bytes_left) {
      refused = REFUSED_BYTES;
      return false;
    }
    if (s->ContainsOnlyOneByte()) {
      // Latin-1 (the usual case): copied as it is, one pass; UTF-8 takes two bytes above 0x7f.
      scratch.resize(length);
      s->WriteOneByte(isolate, reinterpret_cast<uint8_t*>(scratch.data()), 0, static_cast<int>(length),
                      String::NO_NULL_TERMINATION);
      size_t bytes = length;
      for (unsigned char c : scratch) bytes += c >> 7;
      if (!count_bytes(bytes)) return false;
      append_escaped(out, scratch.data(), length, true);
      return true;
    }
    if (length * 3 > bytes_left && static_cast<size_t>(s->Utf8Length(isolate)) > bytes_left) {
      refused = REFUSED_BYTES;
      return false;
    }
    std::string text = utf8(isolate, s);
    if (!count_bytes(text.size())) return false;
    append_escaped(out, text.data(), text.size());
    return true;
  }

  void write_number(double d) {
    if (!std::isfinite(d)) {
      out.append("null");
    } else if (d == std::trunc(d) && std::fabs(d) < 9007199254740992.0) {
      char buf[32];
      snprintf(buf, sizeof buf, "%lld", static_cast<long long>(d));
      out.append(buf);
    } else {
      char buf[40];
      snprintf(buf, sizeof buf, "%.17g", d);
      out.append(buf);
    }
  }

  // 1: wrote a value; 0: nothing to write (undefined, function, symbol); -1: an exception is
  // pending or the budget ran out (`refused`).
  int write(Local<Value> value, Local<Value> key, uint32_t depth) {
    if (!count_value()) return -1;
    if (value->IsObject() || value->IsBigInt()) {
      TryCatch tc(isolate);
      Local<Object> holder;
      if (value->ToObject(context).ToLocal(&holder)) {
        Local<Value> to_json;
        // Lenient: a `toJSON` that cannot be read is no `toJSON` (the object is read as it is).
        if (!holder->Get(context, to_json_key).ToLocal(&to_json)) {
          if (!swallow(tc)) return -1;
          to_json = v8::Undefined(isolate);
        }
        if (to_json->IsFunction()) {
          Local<Value> argv[1] = {key};
          if (!to_json.As<Function>()->Call(context, value, 1, argv).ToLocal(&value)) return swallow(tc) ? 0 : -1;
        }
      } else {
        return swallow(tc) ? 0 : -1;
      }
    }
    if (value->IsNumberObject()) value = v8::Number::New(isolate, value.As<v8::NumberObject>()->ValueOf());
    else if (value->IsStringObject()) value = value.As<v8::StringObject>()->ValueOf();
    else if (value->IsBooleanObject()) value = v8::Boolean::New(isolate, value.As<v8::BooleanObject>()->ValueOf());

    if (value->IsUndefined() || value->IsFunction() || value->IsSymbol()) return 0;
    if (value->IsNull()) {
      out.append("null");
      return 1;
    }
    if (value->IsTrue()) {
      out.append("true");
      return 1;
    }
    if (value->IsFalse()) {
      out.append("false");
      return 1;
    }
    if (value->IsNumber()) {
      write_number(value.As<v8::Number>()->Value());
      return 1;
    }
    if (value->IsString()) return write_string(value.As<String>()) ? 1 : -1;
    if (value->IsBigInt() && lenient) {
      Local<String> text;
      if (!value->ToString(context).ToLocal(&text)) return -1;
      return write_string(text) ? 1 : -1;
    }
    if (value->IsBigInt()) {
      isolate->ThrowException(Exception::TypeError(str(isolate, "Do not know how to serialize a BigInt")));
      return -1;
    }
    if (!value->IsObject()) {
      out.append("null");
      return 1;
    }
    Local<Object> object = value.As<Object>();
    if (depth >= max_depth) {
      out.append("null");
      return 1;
    }
    for (auto& seen : stack) {
      if (seen == object) {
        out.append("null");
        return 1;
      }
    }
    stack.push_back(object);
    int result = value->IsArray() ? write_array(object.As<Array>(), depth) : write_object(object, depth);
    stack.pop_back();
    return result;
  }

  int write_array(Local<Array> array, uint32_t depth) {
    // The length is only a claim: checked before a single element is read.
    uint32_t length = array->Length();
    if (length > max_values) {
      refused = REFUSED_ARRAY;
      claimed = length;
      return -1;
    }
    if (length > values_left) {
      refused = REFUSED_VALUES;
      return -1;
    }
    out.push_back('[');
    for (uint32_t i = 0; i < length; i++) {
      if (i > 0) out.push_back(',');
      HandleScope scope(isolate);
      Local<Value> item;
      {
        TryCatch tc(isolate);
        if (!array->Get(context, i).ToLocal(&item)) {
          if (!swallow(tc)) return -1;
          item = v8::Undefined(isolate);
        }
      }
      Local<String> key;
      if (!v8::Integer::NewFromUnsigned(isolate, i)->ToString(context).ToLocal(&key)) return -1;
      int r = write(item, key, depth + 1);
      if (r < 0) return -1;
      if (r == 0) out.append("null");
    }
    out.push_back(']');
    return 1;
  }

  int write_object(Local<Object> object, uint32_t depth) {
    Local<Array> keys;
    {
      TryCatch tc(isolate);
      if (!object
               ->GetOwnPropertyNames(context, static_cast<v8::PropertyFilter>(v8::ONLY_ENUMERABLE | v8::SKIP_SYMBOLS),
                                     v8::KeyConversionMode::kConvertToString)
               .ToLocal(&keys)) {
        if (!swallow(tc)) return -1;
        keys = Array::New(isolate, 0);
      }
    }
    uint32_t count = keys->Length();
    if (count > values_left) {
      refused = REFUSED_VALUES;
      return -1;
    }
    out.push_back('{');
    bool first = true;
    for (uint32_t i = 0; i < count; i++) {
      HandleScope scope(isolate);
      Local<Value> key;
      if (!keys->Get(context, i).ToLocal(&key) || !key->IsString()) return -1;
      Local<Value> item;
      {
        TryCatch tc(isolate);
        if (!object->Get(context, key).ToLocal(&item)) {
          if (!swallow(tc)) return -1;
          continue;
        }
      }
      size_t mark = out.size();
      if (!first) out.push_back(',');
      if (!write_string(key.As<String>())) return -1;
      out.push_back(':');
      int r = write(item, key, depth + 1);
      if (r < 0) return -1;
      if (r == 0) {
        out.resize(mark);
        continue;
      }
      first = false;
    }
    out.push_back('}');
    return 1;
  }
};

// Walks `value` into `iso->out`. PST_OK, PST_REFUSED (out: the refusal), or -1 (exception pending).
int32_t write_value(Iso* iso, Local<Context> context, Local<Value> value, const PstLimits& limits) {
  iso->out.clear();
  Walker walker{iso->isolate, context, iso->out, limits.max_values, limits.max_values, limits.max_bytes, limits.max_depth,
                iso->to_json_key.Get(iso->isolate), REFUSED_NONE, 0, {}, limits.lenient != 0, {}};
  int r = walker.write(value, String::Empty(iso->isolate), 0);
  if (r == 0) {
    iso->out = "null";
    return PST_OK;
  }
  if (r > 0) return PST_OK;
  if (walker.refused != REFUSED_NONE) {
    char buf[96];
    snprintf(buf, sizeof buf, "{\"kind\":%d,\"claimed\":%.0f}", static_cast<int>(walker.refused), walker.claimed);
    iso->out = buf;
    return PST_REFUSED;
  }
  return -1;
}

// A property of an object as UTF-8, or `fallback` when absent, not a string, or its getter throws.
bool string_property(Isolate* isolate, Local<Context> context, Local<Object> object, const char* name,
                     std::string* into) {
  TryCatch inner(isolate);
  Local<Value> v;
  if (!object->Get(context, str(isolate, name, strlen(name))).ToLocal(&v) || v->IsUndefined() || v->IsNull()) {
    return false;
  }
  Local<String> s;
  if (!v->ToString(context).ToLocal(&s)) return false;
  *into = utf8(isolate, s);
  return true;
}

// The thrown value as JSON {name, message, stack, thrown, retry} in iso->out.
void write_error(Iso* iso, Local<Context> context, Local<Value> exception, Local<v8::Message> message) {
  Isolate* isolate = iso->isolate;
  std::string name, text, stack;
  bool has_stack = false;
  const char* thrown = "error";
  bool retry = false;
  if (exception->IsObject()) {
    Local<Object> object = exception.As<Object>();
    string_property(isolate, context, object, "name", &name);
    string_property(isolate, context, object, "message", &text);
    has_stack = string_property(isolate, context, object, "stack", &stack);
    {
      TryCatch inner(isolate);
      Local<Value> v;
      retry = object->Get(context, str(isolate, "__posthogRetryError")).ToLocal(&v) && v->IsTrue();
    }
    if (name.empty() && text.empty() && !exception->IsNativeError()) {
      thrown = "object";
      TryCatch inner(isolate);
      PstLimits small{10000, 64 * 1024, 16, 1, 0};
      std::string saved;
      saved.swap(iso->out);
      if (write_value(iso, context, exception, small) == PST_OK) text = iso->out;
      iso->out.swap(saved);
    }
  } else {
    thrown = exception->IsString() ? "string" : "primitive";
    TryCatch inner(isolate);
    Local<String> s;
    if (exception->ToDetailString(context).ToLocal(&s)) text = utf8(isolate, s);
  }
  // A SyntaxError at compile time has no stack frames: give its position like Node does.
  if (!message.IsEmpty() && (!has_stack || name == "SyntaxError")) {
    std::string resource;
    Local<Value> r = message->GetScriptResourceName();
    if (!r.IsEmpty() && r->IsString()) resource = utf8(isolate, r.As<String>());
    int line = message->GetLineNumber(context).FromMaybe(0);
    std::string where = resource + ":" + std::to_string(line);
    std::string summary = (name.empty() ? std::string("Error") : name) + ": " + text;
    if (!has_stack) {
      stack = where + "\n" + summary;
      has_stack = true;
    } else if (stack.find(where) == std::string::npos) {
      stack = where + "\n" + stack;
    }
  }
  std::string& out = iso->out;
  out.clear();
  out.append("{\"name\":");
  append_escaped(out, name.data(), name.size());
  out.append(",\"message\":");
  append_escaped(out, text.data(), text.size());
  if (has_stack) {
    out.append(",\"stack\":");
    append_escaped(out, stack.data(), stack.size());
  }
  out.append(",\"thrown\":\"");
  out.append(thrown);
  out.append("\",\"retry\":");
  out.append(retry ? "true" : "false");
  out.push_back('}');
}

// Status of a failed operation under `tc`: terminated, or thrown (with the error in out).
int32_t failure(Iso* iso, Local<Context> context, TryCatch& tc) {
  if (tc.HasTerminated() || iso->isolate->IsExecutionTerminating() || iso->oom) {
    iso->isolate->CancelTerminateExecution();
    return PST_TERMINATED;
  }
  if (!tc.HasCaught()) {
    iso->out = "{\"name\":\"Error\",\"message\":\"the operation failed without an exception\",\"thrown\":\"error\"}";
    return PST_THROWN;
  }
  Local<Value> exception = tc.Exception();
  Local<v8::Message> message = tc.Message();
  tc.Reset();
  write_error(iso, context, exception, message);
  if (iso->isolate->IsExecutionTerminating()) {
    iso->isolate->CancelTerminateExecution();
    return PST_TERMINATED;
  }
  return PST_THROWN;
}

// Runs queued promise jobs. false when terminated.
bool checkpoint(Iso* iso) {
  iso->isolate->PerformMicrotaskCheckpoint();
  if (iso->isolate->IsExecutionTerminating() || iso->oom) return false;
  return true;
}

// The outcome of a value that may be a promise: its result, or PST_PENDING with a call id.
int32_t settle(Iso* iso, Local<Context> context, Local<Value> value, TryCatch& tc, uint64_t* call_id) {
  if (value->IsPromise()) {
    Local<Promise> promise = value.As<Promise>();
    switch (promise->State()) {
      case Promise::kPending: {
        uint64_t id = iso->next_id++;
        iso->calls.emplace(id, Global<Promise>(iso->isolate, promise));
        *call_id = id;
        return PST_PENDING;
      }
      case Promise::kRejected:
        // The caller handles it: not an unhandled rejection.
        promise->MarkAsHandled();
        forget_rejection(iso, promise);
        write_error(iso, context, promise->Result(), Local<v8::Message>());
        if (iso->isolate->IsExecutionTerminating() || iso->oom) {
          iso->isolate->CancelTerminateExecution();
          return PST_TERMINATED;
        }
        return PST_THROWN;
      case Promise::kFulfilled:
        value = promise->Result();
        break;
    }
  }
  int32_t status = write_value(iso, context, value, iso->limits);
  if (status >= 0) return status;
  return failure(iso, context, tc);
}

// Builds the Error a host function throws / an op rejects with, from JSON {name, message}.
Local<Value> error_from_json(Isolate* isolate, Local<Context> context, const char* data, size_t len) {
  Local<Value> parsed;
  Local<String> message = str(isolate, "host function failed");
  Local<Value> name;
  {
    TryCatch inner(isolate);
    if (v8::JSON::Parse(context, str(isolate, data, len)).ToLocal(&parsed) && parsed->IsObject()) {
      Local<Value> m;
      if (parsed.As<Object>()->Get(context, str(isolate, "message")).ToLocal(&m) && m->IsString()) {
        message = m.As<String>();
      }
      if (!parsed.As<Object>()->Get(context, str(isolate, "name")).ToLocal(&name)) name = Local<Value>();
    }
  }
  Local<Value> error = Exception::Error(message);
  if (!name.IsEmpty() && name->IsString() && error->IsObject()) {
    TryCatch inner(isolate);
    if (error.As<Object>()->Set(context, str(isolate, "name"), name).IsNothing()) return error;
  }
  return error;
}

void host_callback(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  HostBinding* binding = static_cast<HostBinding*>(info.Data().As<v8::External>()->Value());
  Iso* iso = binding->iso;
  Local<Context> context = isolate->GetCurrentContext();
  Local<Array> args = Array::New(isolate, info.Length());
  for (int i = 0; i < info.Length(); i++) {
    if (args->Set(context, static_cast<uint32_t>(i), info[i]).IsNothing()) return;
  }
  std::string saved;
  saved.swap(iso->out);
  int32_t status = write_value(iso, context, args, iso->limits);
  std::string json;
  json.swap(iso->out);
  iso->out.swap(saved);
  if (status == PST_REFUSED) {
    // Worded as convert.rs's `Refused`, naming the meta call when the function is the host's `call`.
    std::string name = binding->name.rfind("__pst_", 0) == 0 ? binding->name.substr(6) : binding->name;
    if (name == "call" && info.Length() > 0 && info[0]->IsString()) name = utf8(isolate, info[0].As<String>());
    int kind = 0;
    double claimed = 0;
    std::string reason = json;
    if (sscanf(json.c_str(), "{\"kind\":%d,\"claimed\":%lf}", &kind, &claimed) == 2) {
      char buf[256];
      if (kind == REFUSED_ARRAY) {
        snprintf(buf, sizeof buf, "an array claims a length of %.0f, more than the %zu values one value may hold",
                 claimed, iso->limits.max_values);
      } else if (kind == REFUSED_BYTES) {
        snprintf(buf, sizeof buf, "its strings and keys take more than %zu bytes", iso->limits.max_bytes);
      } else {
        snprintf(buf, sizeof buf,
                 "it holds more than %zu values (array elements and object members, shared ones counted each "
                 "time they appear)",
                 iso->limits.max_values);
      }
      reason = buf;
    }
    std::string message = "The plugin server refused the arguments of " + name + ": " + reason;
    isolate->ThrowException(Exception::RangeError(str(isolate, message)));
    return;
  }
  if (status != PST_OK) return;  // an exception is pending (a throwing getter, termination)
  if (binding->is_async) {
    Local<v8::Promise::Resolver> resolver;
    if (!v8::Promise::Resolver::New(context).ToLocal(&resolver)) return;
    uint64_t op_id = iso->next_id++;
    iso->ops.emplace(op_id, Global<v8::Promise::Resolver>(isolate, resolver));
    iso->callbacks.host_async(iso->user, binding->fn_id, op_id, json.data(), json.size());
    info.GetReturnValue().Set(resolver->GetPromise());
    return;
  }
  PstReply reply{1, nullptr, 0};
  iso->callbacks.host_call(iso->user, binding->fn_id, json.data(), json.size(), &reply);
  if (reply.status == 2) {
    Local<String> result;
    if (reply.len > static_cast<size_t>(String::kMaxLength) ||
        !String::NewFromOneByte(isolate, reinterpret_cast<const uint8_t*>(reply.ptr), v8::NewStringType::kNormal,
                                static_cast<int>(reply.len))
             .ToLocal(&result)) {
      isolate->ThrowException(Exception::RangeError(str(isolate, "Invalid string length")));
      return;
    }
    info.GetReturnValue().Set(result);
  } else if (reply.status == 0) {
    Local<Value> result;
    if (reply.len == 0) {
      info.GetReturnValue().SetUndefined();
    } else if (v8::JSON::Parse(context, str(isolate, reply.ptr, reply.len)).ToLocal(&result)) {
      info.GetReturnValue().Set(result);
    }
  } else {
    isolate->ThrowException(error_from_json(isolate, context, reply.ptr, reply.len));
  }
}

const char* const kConsoleLevels[] = {"log", "info", "warn", "error", "debug"};

void console_callback(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  Iso* iso = static_cast<Iso*>(isolate->GetData(0));
  uint32_t level = static_cast<uint32_t>(info.Data().As<v8::Integer>()->Value());
  Local<Context> context = isolate->GetCurrentContext();
  std::string line;
  for (int i = 0; i < info.Length(); i++) {
    if (i > 0) line.push_back(' ');
    Local<Value> v = info[i];
    if (v->IsString()) {
      line += utf8(isolate, v.As<String>());
    } else if (v->IsObject() && !v->IsFunction() && !v->IsNativeError()) {
      std::string saved;
      saved.swap(iso->out);
      PstLimits small{100000, 1 << 20, 32, 1, 0};
      int32_t status = write_value(iso, context, v, small);
      if (status == PST_OK) line += iso->out;
      iso->out.swap(saved);
      if (status < 0) return;  // exception pending
      if (status == PST_REFUSED) line += "[too large]";
    } else {
      Local<String> s;
      if (!v->ToDetailString(context).ToLocal(&s)) return;
      line += utf8(isolate, s);
    }
  }
  iso->callbacks.console(iso->user, level, line.data(), line.size());
}

bool install_host_fn(Iso* iso, Local<Context> context, const HostFn& fn) {
  Isolate* isolate = iso->isolate;
  auto binding = std::make_unique<HostBinding>(HostBinding{iso, fn.fn_id, fn.is_async, fn.name});
  Local<FunctionTemplate> tpl =
      FunctionTemplate::New(isolate, host_callback, v8::External::New(isolate, binding.get()));
  iso->bindings.push_back(std::move(binding));
  Local<Function> f;
  if (!tpl->GetFunction(context).ToLocal(&f)) return false;
  f->SetName(str(isolate, fn.name));
  return context->Global()->Set(context, str(isolate, fn.name), f).FromMaybe(false);
}

bool install_console(Iso* iso, Local<Context> context) {
  Isolate* isolate = iso->isolate;
  Local<Object> console = Object::New(isolate);
  for (uint32_t level = 0; level < 5; level++) {
    Local<FunctionTemplate> tpl = FunctionTemplate::New(isolate, console_callback, v8::Integer::New(isolate, level));
    Local<Function> f;
    if (!tpl->GetFunction(context).ToLocal(&f)) return false;
    if (!console->Set(context, str(isolate, kConsoleLevels[level]), f).FromMaybe(false)) return false;
  }
  return context->Global()->Set(context, str(isolate, "console"), console).FromMaybe(false);
}

// The watchdog's interrupt: records the stack where JS was, then terminates.
void record_and_terminate(Isolate* isolate, void* data) {
  Iso* iso = static_cast<Iso*>(data);
  if (!iso->terminate_wanted.exchange(false)) return;
  {
    HandleScope hs(isolate);
    Local<v8::StackTrace> trace = v8::StackTrace::CurrentStackTrace(isolate, 16);
    std::string text;
    for (int i = 0; i < trace->GetFrameCount(); i++) {
      Local<v8::StackFrame> frame = trace->GetFrame(isolate, static_cast<uint32_t>(i));
      std::string function, script;
      Local<String> f = frame->GetFunctionName();
      if (!f.IsEmpty()) function = utf8(isolate, f);
      Local<String> name = frame->GetScriptName();
      if (!name.IsEmpty()) script = utf8(isolate, name);
      text += "    at " + (function.empty() ? std::string("<anonymous>") : function) + " (" + script + ":" +
              std::to_string(frame->GetLineNumber()) + ":" + std::to_string(frame->GetColumn()) + ")\n";
    }
    iso->term_stack = text;
  }
  isolate->TerminateExecution();
}

// Serves an import of a module compiled by `__pst_compile`: the resolver's source text, compiled
// once per specifier.
MaybeLocal<Module> resolve_import(Local<Context> context, Local<String> specifier, Local<v8::FixedArray>,
                                  Local<Module>) {
  Isolate* isolate = context->GetIsolate();
  Iso* iso = static_cast<Iso*>(isolate->GetData(0));
  std::string name = utf8(isolate, specifier);
  auto found = iso->modules.find(name);
  if (found != iso->modules.end()) return found->second.Get(isolate);
  if (iso->resolver.IsEmpty()) {
    std::string message = "Cannot find module '" + name + "'";
    isolate->ThrowException(Exception::Error(str(isolate, message)));
    return MaybeLocal<Module>();
  }
  Local<Value> argv[1] = {specifier};
  Local<Value> source;
  if (!iso->resolver.Get(isolate)->Call(context, v8::Undefined(isolate), 1, argv).ToLocal(&source)) {
    return MaybeLocal<Module>();
  }
  if (!source->IsString()) {
    isolate->ThrowException(Exception::TypeError(str(isolate, "the import resolver gave no source")));
    return MaybeLocal<Module>();
  }
  ScriptOrigin origin(isolate, specifier, 0, 0, false, -1, Local<Value>(), false, false, true);
  ScriptCompiler::Source src(source.As<String>(), origin);
  Local<Module> module;
  if (!ScriptCompiler::CompileModule(isolate, &src).ToLocal(&module)) return MaybeLocal<Module>();
  iso->modules.emplace(name, Global<Module>(isolate, module));
  return module;
}

// `__pst_compile(kind, source, filename, lineOffset, resolve)`: kind "script" runs a classic
// script and answers its completion value; "module" compiles an ES module (imports served by
// `resolve(specifier)` → source text), evaluates it and answers `[namespace, evaluationPromise]`.
// Taken (and deleted from the global object) by v8/bootstrap.js before plugin code runs.
void compile_callback(const FunctionCallbackInfo<Value>& info) {
  Isolate* isolate = info.GetIsolate();
  Iso* iso = static_cast<Iso*>(isolate->GetData(0));
  Local<Context> context = isolate->GetCurrentContext();
  if (info.Length() < 3 || !info[0]->IsString() || !info[1]->IsString() || !info[2]->IsString()) {
    isolate->ThrowException(Exception::TypeError(str(isolate, "compile(kind, source, filename)")));
    return;
  }
  std::string kind = utf8(isolate, info[0].As<String>());
  Local<String> source_text = info[1].As<String>();
  Local<String> name = info[2].As<String>();
  int line_offset = info.Length() > 3 && info[3]->IsInt32() ? info[3].As<v8::Int32>()->Value() : 0;
  if (kind == "module") {
    ScriptOrigin origin(isolate, name, line_offset, 0, false, -1, Local<Value>(), false, false, true);
    ScriptCompiler::Source source(source_text, origin);
    Local<Module> module;
    if (!ScriptCompiler::CompileModule(isolate, &source).ToLocal(&module)) return;
    if (info.Length() > 4 && info[4]->IsFunction()) iso->resolver.Reset(isolate, info[4].As<Function>());
    bool instantiated = module->InstantiateModule(context, resolve_import).FromMaybe(false);
    iso->resolver.Reset();
    if (!instantiated) return;
    Local<Value> completion;
    if (!module->Evaluate(context).ToLocal(&completion)) return;
    Local<Array> pair = Array::New(isolate, 2);
    if (pair->Set(context, 0, module->GetModuleNamespace()).IsNothing()) return;
    if (pair->Set(context, 1, completion).IsNothing()) return;
    info.GetReturnValue().Set(pair);
    return;
  }
  ScriptOrigin origin(isolate, name, line_offset, 0);
  std::string filename = utf8(isolate, name);
  bool use_cache = cacheable(filename);
  std::string key = use_cache ? cache_key(isolate, filename, source_text) : std::string();
  std::shared_ptr<const std::vector<uint8_t>> hold = use_cache ? cache_find(key) : nullptr;
  ScriptCompiler::Source source(source_text, origin, cached_data(hold));
  Local<v8::Script> script;
  auto options = hold ? ScriptCompiler::kConsumeCodeCache : ScriptCompiler::kNoCompileOptions;
  if (!ScriptCompiler::Compile(context, &source, options).ToLocal(&script)) return;
  if (hold && source.GetCachedData() && source.GetCachedData()->rejected) cache_drop(key);
  Local<Value> completion;
  if (!script->Run(context).ToLocal(&completion)) return;
  // Made after the run, the cache holds the functions the run compiled too.
  if (use_cache && !hold) cache_store(key, ScriptCompiler::CreateCodeCache(script->GetUnboundScript()));
  info.GetReturnValue().Set(completion);
}

bool install_compile(Iso* iso, Local<Context> context) {
  Isolate* isolate = iso->isolate;
  Local<FunctionTemplate> tpl = FunctionTemplate::New(isolate, compile_callback);
  Local<Function> f;
  if (!tpl->GetFunction(context).ToLocal(&f)) return false;
  return context->Global()->Set(context, str(isolate, "__pst_compile"), f).FromMaybe(false);
}

MaybeLocal<Module> refuse_import(Local<Context> context, Local<String> specifier, Local<v8::FixedArray>,
                                 Local<Module>) {
  Isolate* isolate = context->GetIsolate();
  std::string message = "Cannot find module '" + utf8(isolate, specifier) + "'";
  isolate->ThrowException(Exception::Error(str(isolate, message)));
  return MaybeLocal<Module>();
}

Realm* realm_of(Iso* iso, uint32_t realm) {
  if (realm >= iso->realms.size()) return nullptr;
  return iso->realms[realm].get();
}

}  // namespace

extern "C" {

// Initialises V8 once per process (later calls do nothing). `flags` are V8 flags, may be empty.
void pst_v8_init(const char* flags) {
  std::call_once(g_init_once, [flags]() {
    if (flags && *flags) v8::V8::SetFlagsFromString(flags);
    v8::V8::InitializeICU();
    g_platform = v8::platform::NewDefaultPlatform().release();
    v8::V8::InitializePlatform(g_platform);
    v8::V8::Initialize();
  });
}

const char* pst_v8_version() { return v8::V8::GetVersion(); }

// `array_buffer_limit`: the budget of the isolate's ArrayBuffer memory (BudgetAllocator; 0: none).
Iso* pst_v8_isolate_new(size_t heap_limit, size_t array_buffer_limit, size_t stack_bytes, PstLimits limits,
                        void* user, PstCallbacks callbacks) {
  auto iso = std::make_unique<Iso>();
  iso->allocator = new BudgetAllocator(array_buffer_limit);
  Isolate::CreateParams params;
  params.array_buffer_allocator = iso->allocator;
  if (heap_limit > 0) params.constraints.ConfigureDefaultsFromHeapSize(0, heap_limit);
  Isolate* isolate = Isolate::New(params);
  if (!isolate) {
    delete iso->allocator;
    return nullptr;
  }
  iso->isolate = isolate;
  iso->user = user;
  iso->callbacks = callbacks;
  iso->limits = limits;
  iso->stack_bytes = stack_bytes;
  iso->heap_limit = heap_limit;
  isolate->SetData(0, iso.get());
  isolate->SetMicrotasksPolicy(v8::MicrotasksPolicy::kExplicit);
  isolate->SetAllowAtomicsWait(false);
  isolate->AddNearHeapLimitCallback(near_heap_limit, iso.get());
  isolate->AddGCEpilogueCallback(after_full_gc, iso.get(), v8::kGCTypeMarkSweepCompact);
  isolate->SetPromiseRejectCallback(on_reject);
  {
    Isolate::Scope scope(isolate);
    HandleScope hs(isolate);
    iso->to_json_key.Reset(isolate, String::NewFromUtf8Literal(isolate, "toJSON", v8::NewStringType::kInternalized));
  }
  return iso.release();
}

void pst_v8_isolate_free(Iso* iso) {
  if (!iso) return;
  {
    Isolate::Scope scope(iso->isolate);
    iso->calls.clear();
    iso->ops.clear();
    iso->realms.clear();
    iso->to_json_key.Reset();
    iso->rejections.clear();
    iso->resolver.Reset();
    iso->modules.clear();
  }
  iso->isolate->Dispose();
  delete iso->allocator;
  delete iso;
}

// May be called from any thread (the watchdog).
void pst_v8_terminate(Iso* iso) { iso->isolate->TerminateExecution(); }

// May be called from any thread (the watchdog): asks the running JS to record where it is
// (pst_v8_term_stack) and terminate, at its next interrupt check.
void pst_v8_interrupt(Iso* iso) {
  iso->terminate_wanted.store(true);
  iso->isolate->RequestInterrupt(record_and_terminate, iso);
}

// Withdraws a termination that arrived after the code it was meant for had finished.
void pst_v8_cancel_terminate(Iso* iso) {
  iso->terminate_wanted.store(false);
  iso->isolate->CancelTerminateExecution();
}

// Where JS was when the deadline interrupted it (then forgotten); empty when unknown.
size_t pst_v8_term_stack(Iso* iso, const char** ptr) {
  iso->out.swap(iso->term_stack);
  iso->term_stack.clear();
  *ptr = iso->out.data();
  return iso->out.size();
}

// 1: the heap limit was reached (the isolate is dead); 2: a call went over the GC budget (the
// mark is cleared by this read); 0: neither.
int32_t pst_v8_oom(Iso* iso) {
  if (iso->oom) return 1;
  if (iso->over_budget) {
    iso->over_budget = false;
    return 2;
  }
  return 0;
}

// A full GC now (for heap figures), which never counts against the GC budget.
void pst_v8_gc(Iso* iso) {
  if (iso->oom) return;
  Isolate::Scope scope(iso->isolate);
  iso->collecting = true;
  iso->isolate->LowMemoryNotification();
  iso->collecting = false;
}

void pst_v8_heap(Iso* iso, size_t* used, size_t* total, size_t* limit) {
  v8::HeapStatistics stats;
  iso->isolate->GetHeapStatistics(&stats);
  *used = stats.used_heap_size();
  *total = stats.total_heap_size();
  *limit = stats.heap_size_limit();
}

// The isolate's live ArrayBuffer bytes, its budget (0: none) and how many allocations it refused.
// May be called from any thread.
void pst_v8_array_buffers(Iso* iso, size_t* used, size_t* budget, uint64_t* refused) {
  *used = iso->allocator->used();
  *budget = iso->allocator->budget();
  *refused = iso->allocator->refused();
}

// The text of the last result (valid until the next call on this isolate).
size_t pst_v8_out(Iso* iso, const char** ptr) {
  *ptr = iso->out.data();
  return iso->out.size();
}

// Defines a host function as a global of every realm, now and later. 0 on success.
int32_t pst_v8_define_host(Iso* iso, const char* name, size_t name_len, uint32_t fn_id, int32_t is_async) {
  HostFn fn{std::string(name, name_len), fn_id, is_async != 0};
  iso->host_fns.push_back(fn);
  Isolate::Scope scope(iso->isolate);
  HandleScope hs(iso->isolate);
  for (auto& realm : iso->realms) {
    Local<Context> context = realm->context.Get(iso->isolate);
    Context::Scope cs(context);
    if (!install_host_fn(iso, context, fn)) return 1;
  }
  return 0;
}

// A new realm (context) with console and the host functions. Its index, or -1.
int64_t pst_v8_realm_new(Iso* iso) {
  if (iso->oom) return -1;
  Isolate* isolate = iso->isolate;
  Isolate::Scope scope(isolate);
  HandleScope hs(isolate);
  set_stack_limit(iso);
  Local<Context> context = Context::New(isolate);
  if (context.IsEmpty()) return -1;
  Context::Scope cs(context);
  if (!install_console(iso, context)) return -1;
  if (!install_compile(iso, context)) return -1;
  for (auto& fn : iso->host_fns) {
    if (!install_host_fn(iso, context, fn)) return -1;
  }
  auto realm = std::make_unique<Realm>();
  realm->context.Reset(isolate, context);
  realm->exports.Reset(isolate, Object::New(isolate));
  iso->realms.push_back(std::move(realm));
  return static_cast<int64_t>(iso->realms.size() - 1);
}

// Compiles and runs code in a realm. kind 0: classic script; 1: ES module (imports refused; its
// namespace becomes the exports); 2: function body called with one argument `exports` (an object
// it returns replaces it). A module with top-level await may answer PST_PENDING.
int32_t pst_v8_load(Iso* iso, uint32_t realm_index, int32_t kind, const char* code, size_t code_len,
                    const char* filename, size_t filename_len, uint64_t* call_id) {
  if (iso->oom) return PST_DEAD;
  Realm* realm = realm_of(iso, realm_index);
  if (!realm) return PST_NOT_FOUND;
  Isolate* isolate = iso->isolate;
  Isolate::Scope scope(isolate);
  HandleScope hs(isolate);
  set_stack_limit(iso);
  Local<Context> context = realm->context.Get(isolate);
  Context::Scope cs(context);
  TryCatch tc(isolate);
  Local<String> source_text = str(isolate, code, code_len);
  Local<String> name = str(isolate, filename, filename_len);
  Local<Value> completion;
  if (kind == 1) {
    ScriptOrigin origin(isolate, name, 0, 0, false, -1, Local<Value>(), false, false, true);
    ScriptCompiler::Source source(source_text, origin);
    Local<Module> module;
    if (!ScriptCompiler::CompileModule(isolate, &source).ToLocal(&module)) return failure(iso, context, tc);
    if (!module->InstantiateModule(context, refuse_import).FromMaybe(false)) return failure(iso, context, tc);
    if (!module->Evaluate(context).ToLocal(&completion)) return failure(iso, context, tc);
    realm->exports.Reset(isolate, module->GetModuleNamespace().As<Object>());
  } else if (kind == 2) {
    ScriptOrigin origin(isolate, name);
    std::string file(filename, filename_len);
    bool use_cache = cacheable(file);
    std::string key = use_cache ? cache_key(isolate, file, source_text) : std::string();
    std::shared_ptr<const std::vector<uint8_t>> hold = use_cache ? cache_find(key) : nullptr;
    ScriptCompiler::Source source(source_text, origin, cached_data(hold));
    Local<String> params[1] = {str(isolate, "exports")};
    Local<Function> function;
    auto options = hold ? ScriptCompiler::kConsumeCodeCache : ScriptCompiler::kNoCompileOptions;
    if (!ScriptCompiler::CompileFunction(context, &source, 1, params, 0, nullptr, options).ToLocal(&function)) {
      return failure(iso, context, tc);
    }
    if (hold && source.GetCachedData() && source.GetCachedData()->rejected) cache_drop(key);
    Local<Object> exports = Object::New(isolate);
    Local<Value> argv[1] = {exports};
    Local<Value> returned;
    if (!function->Call(context, v8::Undefined(isolate), 1, argv).ToLocal(&returned)) return failure(iso, context, tc);
    if (use_cache && !hold) cache_store(key, ScriptCompiler::CreateCodeCacheForFunction(function));
    realm->exports.Reset(isolate, returned->IsObject() && !returned->IsPromise() ? returned.As<Object>() : exports);
    completion = returned;
  } else {
    ScriptOrigin origin(isolate, name);
    v8::ScriptCompiler::Source source(source_text, origin);
    Local<v8::Script> script;
    if (!ScriptCompiler::Compile(context, &source).ToLocal(&script)) return failure(iso, context, tc);
    if (!script->Run(context).ToLocal(&completion)) return failure(iso, context, tc);
  }
  if (!checkpoint(iso)) return failure(iso, context, tc);
  if (kind == 1 || (kind == 2 && completion->IsPromise())) {
    int32_t status = settle(iso, context, completion, tc, call_id);
    if (status == PST_OK) iso->out = "null";
    return status;
  }
  iso->out = "null";
  return PST_OK;
}

// Calls the function `name` of the realm's exports (or, failing that, of its global object) with
// the arguments `args` (a JSON array), runs the promise jobs, and answers its result.
int32_t pst_v8_call(Iso* iso, uint32_t realm_index, const char* name, size_t name_len, const char* args,
                    size_t args_len, uint64_t* call_id) {
  if (iso->oom) return PST_DEAD;
  Realm* realm = realm_of(iso, realm_index);
  if (!realm) return PST_NOT_FOUND;
  Isolate* isolate = iso->isolate;
  Isolate::Scope scope(isolate);
  HandleScope hs(isolate);
  set_stack_limit(iso);
  Local<Context> context = realm->context.Get(isolate);
  Context::Scope cs(context);
  TryCatch tc(isolate);
  Local<String> key = str(isolate, name, name_len);
  Local<Value> target;
  if (!realm->exports.Get(isolate)->Get(context, key).ToLocal(&target)) return failure(iso, context, tc);
  if (!target->IsFunction()) {
    if (!context->Global()->Get(context, key).ToLocal(&target)) return failure(iso, context, tc);
    if (!target->IsFunction()) return PST_NOT_FOUND;
  }
  Local<Value> parsed;
  if (!v8::JSON::Parse(context, str(isolate, args, args_len)).ToLocal(&parsed)) return failure(iso, context, tc);
  std::vector<Local<Value>> argv;
  if (parsed->IsArray()) {
    Local<Array> list = parsed.As<Array>();
    for (uint32_t i = 0; i < list->Length(); i++) {
      Local<Value> item;
      if (!list->Get(context, i).ToLocal(&item)) return failure(iso, context, tc);
      argv.push_back(item);
    }
  }
  Local<Value> result;
  if (!target.As<Function>()
           ->Call(context, v8::Undefined(isolate), static_cast<int>(argv.size()), argv.data())
           .ToLocal(&result)) {
    int32_t status = failure(iso, context, tc);
    // Jobs queued before the throw still run (as they would in Node).
    if (status == PST_THROWN && !checkpoint(iso)) {
      isolate->CancelTerminateExecution();
      return PST_TERMINATED;
    }
    return status;
  }
  if (!checkpoint(iso)) return failure(iso, context, tc);
  return settle(iso, context, result, tc, call_id);
}

// The state of a pending call: PST_PENDING while its promise is, else its outcome (then forgotten).
int32_t pst_v8_poll(Iso* iso, uint32_t realm_index, uint64_t call_id) {
  if (iso->oom) return PST_DEAD;
  auto found = iso->calls.find(call_id);
  if (found == iso->calls.end()) return PST_NOT_FOUND;
  Realm* realm = realm_of(iso, realm_index);
  if (!realm) return PST_NOT_FOUND;
  Isolate* isolate = iso->isolate;
  Isolate::Scope scope(isolate);
  HandleScope hs(isolate);
  set_stack_limit(iso);
  Local<Context> context = realm->context.Get(isolate);
  Context::Scope cs(context);
  TryCatch tc(isolate);
  Local<Promise> promise = found->second.Get(isolate);
  if (promise->State() == Promise::kPending) return PST_PENDING;
  iso->calls.erase(found);
  uint64_t unused = 0;
  return settle(iso, context, promise, tc, &unused);
}

void pst_v8_forget(Iso* iso, uint64_t call_id) { iso->calls.erase(call_id); }

// The oldest unhandled rejection as error JSON in out (then forgotten): 1, or 0 when none is left.
int32_t pst_v8_take_rejection(Iso* iso, uint32_t realm_index) {
  Realm* realm = realm_of(iso, realm_index);
  if (iso->oom || !realm || iso->rejections.empty()) return 0;
  Isolate* isolate = iso->isolate;
  Isolate::Scope scope(isolate);
  HandleScope hs(isolate);
  set_stack_limit(iso);
  // The realm the promise was made in (a realm reads its own objects).
  Local<Context> context;
  if (!iso->rejections.front().first.Get(isolate)->GetCreationContext().ToLocal(&context)) {
    context = realm->context.Get(isolate);
  }
  Context::Scope cs(context);
  TryCatch tc(isolate);
  Local<Value> reason = iso->rejections.front().second.Get(isolate);
  iso->rejections.erase(iso->rejections.begin());
  write_error(iso, context, reason, Local<v8::Message>());
  if (isolate->IsExecutionTerminating()) isolate->CancelTerminateExecution();
  return 1;
}

// Settles a host async op (ok: `json` is the value; else JSON {name, message} of the rejection)
// and runs the promise jobs. PST_OK, PST_NOT_FOUND (unknown op), PST_TERMINATED or PST_DEAD.
int32_t pst_v8_settle_op(Iso* iso, uint32_t realm_index, uint64_t op_id, int32_t ok, const char* json,
                         size_t len) {
  if (iso->oom) return PST_DEAD;
  auto found = iso->ops.find(op_id);
  if (found == iso->ops.end()) return PST_NOT_FOUND;
  Realm* realm = realm_of(iso, realm_index);
  if (!realm) return PST_NOT_FOUND;
  Isolate* isolate = iso->isolate;
  Isolate::Scope scope(isolate);
  HandleScope hs(isolate);
  set_stack_limit(iso);
  Local<Context> context = realm->context.Get(isolate);
  Context::Scope cs(context);
  TryCatch tc(isolate);
  Local<v8::Promise::Resolver> resolver = found->second.Get(isolate);
  iso->ops.erase(found);
  if (ok) {
    Local<Value> value = v8::Undefined(isolate);
    if (len > 0 && !v8::JSON::Parse(context, str(isolate, json, len)).ToLocal(&value)) {
      return failure(iso, context, tc);
    }
    if (resolver->Resolve(context, value).IsNothing()) return failure(iso, context, tc);
  } else {
    if (resolver->Reject(context, error_from_json(isolate, context, json, len)).IsNothing()) {
      return failure(iso, context, tc);
    }
  }
  if (!checkpoint(iso)) return failure(iso, context, tc);
  iso->out = "null";
  return PST_OK;
}

}  // extern "C"
