// The original's side of benches/export_pg.rs: PostHog/postgres-plugin on Node with node-postgres
// 8.7.1 (the reference's), its exportEvents and uploadBatchToPostgres job called in turn, as the
// Rust bench does. Run (Node 20, in a scratch folder with `npm install pg@8.7.1 typescript@4`):
//   NODE_PATH=<scratch>/node_modules node benches/export_pg_node.js tests/data/plugins/postgres-plugin/index.ts
const ts = require('typescript')
const fs = require('fs')
const source = fs.readFileSync(process.argv[2], 'utf8')
const js = ts.transpileModule(source, { compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2019 } }).outputText
const exports_ = {}
const modules = { pg: require('pg'), '@posthog/plugin-scaffold': {} }
new Function('exports', 'require', js)(exports_, (m) => modules[m])
const N = Number(process.env.BENCH_EVENTS || 20000), BATCH = Number(process.env.BENCH_BATCH || 500)
const table = 'bench_export_node_' + Date.now()
let peak = 0
const sample = () => { peak = Math.max(peak, process.memoryUsage().rss) }
;(async () => {
    const queued = []
    const meta = {
        config: { host: '127.0.0.1', port: '5432', dbName: 'postgres', tableName: table, dbUsername: 'postgres', dbPassword: 'x', hasSelfSignedCert: 'Yes', eventsToIgnore: '' },
        global: {},
        jobs: { uploadBatchToPostgres: (payload) => ({ runNow: async () => { queued.push(payload) } }) },
    }
    console.log = () => {}
    await exports_.setupPlugin(meta)
    const event = (i) => ({ event: 'bench', distinct_id: 'u' + (i % 100), team_id: 2, uuid: '0178' + String(i).padStart(28, '0'), ip: '1.2.3.4', site_url: 'http://x', now: '2021-11-01T10:00:00.000Z', timestamp: '2021-11-01T10:00:00.000Z', properties: { $current_url: 'http://x/' + i, n: i, nested: { a: [1, 2, 3], b: 'text' } } })
    const started = process.hrtime.bigint()
    for (let i = 0; i < N; i += BATCH) {
        const batch = []
        for (let j = i; j < Math.min(N, i + BATCH); j++) batch.push(event(j))
        await exports_.exportEvents(batch, meta)
        while (queued.length) await exports_.jobs.uploadBatchToPostgres(queued.shift(), meta)
        sample()
    }
    const seconds = Number(process.hrtime.bigint() - started) / 1e9
    const { Client } = require('pg')
    const c = new Client({ host: '127.0.0.1', user: 'postgres', database: 'postgres' }); await c.connect()
    const rows = (await c.query(`SELECT count(*) FROM ${table}`)).rows[0].count
    await c.query(`DROP TABLE ${table}`); await c.end()
    console.info(`node ${process.version}: ${N} events, ${rows} rows, ${(N / seconds).toFixed(0)} events/s, peak RSS ${(peak / 1048576).toFixed(1)} MiB`)
})()
