// URL / URLSearchParams cases: the same function runs in Node 20 (to produce
// tests/data/url_node20.json) and inside a plugin on the server (tests/compat_original.rs).
function urlCases() {
    const FIELDS = ['href', 'origin', 'protocol', 'username', 'password', 'host', 'hostname', 'port', 'pathname', 'search', 'hash'];
    const show = (u) => Object.fromEntries(FIELDS.map((f) => [f, u[f]]));
    const attempt = (fn) => {
        try {
            return fn();
        } catch (e) {
            return { error: { name: e.name, message: e.message, code: e.code, input: e.input, string: String(e), stack0: String(e.stack).split('\n')[0] } };
        }
    };
    const parse = [
        ['https://example.com/some/path/?q=1'],
        ['https://example.com/some/path/?q=1#frag'],
        ['HTTPS://EXAMPLE.COM:443/a/../b/./c?x#y'],
        ['http://example.com:80/'],
        ['http://example.com:8080'],
        ['ws://example.com:80/'],
        ['ftp://example.com:21/x'],
        ['../c/d?e', 'https://example.com/a/b/'],
        ['//other.org/p', 'https://example.com/a'],
        ['?only=query', 'https://example.com/a/b?c=d#e'],
        ['#frag', 'https://example.com/a?b'],
        ['', 'https://example.com/a?b#c'],
        ['http://[::1]:3000/x'],
        ['http://[2001:DB8:0:0:0:0:0:1]/'],
        ['http://192.168.0.257/'],
        ['http://0x7f.1/'],
        ['https://münchen.de/straße'],
        ['https://xn--mnchen-3ya.de/'],
        ['https://EXAMPLE.com/ä ö?ü=1 2#ß x'],
        ['https://user:pa ss@example.com/'],
        ['https://example.com/a%2fb%zz?%41=%42'],
        ['https://example.com/  spaced  path'],
        ['  https://example.com/trim  '],
        ['https://example.com/a\tb\nc'],
        ['file:///etc/passwd'],
        ['file://localhost/c:/x'],
        ['file:/x/y'],
        ['blob:https://example.com/uuid-1234'],
        ['mailto:someone@example.com?subject=hi there'],
        ['data:text/plain,hello world'],
        ['javascript:alert(1)'],
        ['custom-scheme://host/path?x'],
        ['http://example.com/?a=1&b=2+3&c=%20'],
        ['https://example.com/p?'],
        ['https://example.com/p#'],
        ['http:example.com/x'],
        ['foo'],
        [''],
        ['https://'],
        ['http://exa mple.com/'],
        ['http://[::1/'],
        ['https://example.com:99999/'],
        ['/relative/only'],
        ['/x', 'not a base'],
    ];
    const out = { parse: parse.map((args) => [args, attempt(() => show(new URL(...args)))]) };

    const steps = [];
    const record = (label, u) => steps.push([label, u.href, u.search, String(u.searchParams)]);
    const u = new URL('https://example.com/some/path/?q=1&q=2&x=a+b%20c');
    record('start', u);
    steps.push(['get', u.searchParams.get('q'), u.searchParams.getAll('q'), u.searchParams.get('x'), u.searchParams.get('nope')]);
    u.searchParams.append('new key', 'va&lue=1+2 ~*()!\'');
    record('append', u);
    u.searchParams.set('q', 'only');
    record('set', u);
    u.searchParams.delete('x');
    record('delete', u);
    u.searchParams.sort();
    record('sort', u);
    u.searchParams.delete('q');
    u.searchParams.delete('new key');
    record('emptied', u);
    u.search = '?a=1&a=2';
    record('search set', u);
    u.hash = 'h';
    u.pathname = '/new path/';
    u.port = '8443';
    record('setters', u);
    u.port = '443';
    u.protocol = 'http';
    u.hostname = 'other.example';
    record('more setters', u);
    u.host = 'h.example:81';
    u.username = 'me';
    u.password = 'se:cret';
    record('credentials', u);
    u.href = 'https://reset.example/?z=9';
    record('href', u);
    out.steps = steps;

    const p = new URLSearchParams('?b=2&a=1&b=1&c=%zz&d=%F0%9F%98%80&e&=x&f==');
    out.params = {
        entries: [...p],
        keys: [...p.keys()],
        values: [...p.values()],
        string: p.toString(),
        has: [p.has('a'), p.has('z')],
        fromObject: new URLSearchParams({ a: 1, b: 'x y', c: null }).toString(),
        fromPairs: new URLSearchParams([['a', '1'], ['b', '+']]).toString(),
        fromParams: new URLSearchParams(p).toString(),
        plus: new URLSearchParams('a=b+c&d=e%2Bf').get('a') + '|' + new URLSearchParams('a=b+c&d=e%2Bf').get('d'),
        forEach: (() => {
            const seen = [];
            p.forEach((v, k) => seen.push(k + '=' + v));
            return seen;
        })(),
    };
    p.sort();
    out.params.sorted = p.toString();
    out.errors = [attempt(() => new URL('foo')), attempt(() => new URL('/x', 'bad base'))];
    out.json = JSON.stringify({ u: new URL('https://example.com/a?b') });
    return out;
}

if (typeof module !== 'undefined' && require.main === module) {
    console.log(JSON.stringify(urlCases(), null, 1));
}
