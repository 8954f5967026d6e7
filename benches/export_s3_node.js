// The original's side of benches/export_s3.rs: PostHog/s3-export-plugin on Node with aws-sdk
// 2.927.0 (the reference's), its exportEvents called batch after batch, as the Rust bench does,
// into moto (`scripts/moto serve PORT`, bucket `bench` created). Run (Node 20, in a scratch folder
// with `npm install aws-sdk@2.927.0 typescript@4`):
//   NODE_PATH=<scratch>/node_modules BENCH_ENDPOINT=http://127.0.0.1:PORT \
//     node benches/export_s3_node.js tests/data/plugins/s3-export-plugin/index.ts
const ts = require('typescript')
const fs = require('fs')
const source = fs.readFileSync(process.argv[2], 'utf8')
const js = ts.transpileModule(source, { compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2019 } }).outputText
const exports_ = {}
class RetryError extends Error {}
const modules = { 'aws-sdk': require('aws-sdk'), crypto: require('crypto'), zlib: require('zlib'), '@posthog/plugin-scaffold': { RetryError } }
new Function('exports', 'require', js)(exports_, (m) => modules[m])
const N = Number(process.env.BENCH_EVENTS || 20000), BATCH = Number(process.env.BENCH_BATCH || 500)
const endpoint = process.env.BENCH_ENDPOINT
let peak = 0
const sample = () => { peak = Math.max(peak, process.memoryUsage().rss) }
;(async () => {
    const meta = {
        config: { awsAccessKey: 'AKIDBENCH', awsSecretAccessKey: 'bench-secret', awsRegion: 'us-east-1', s3BucketName: 'bench', s3BucketEndpoint: endpoint, s3ForcePathStyle: 'true', prefix: 'node/', eventsToIgnore: '', compression: process.env.BENCH_COMPRESSION || 'gzip', signatureVersion: '', sse: 'disabled' },
        global: {},
    }
    console.log = () => {}
    await exports_.setupPlugin(meta)
    const event = (i) => ({ event: 'bench', distinct_id: 'u' + (i % 100), team_id: 2, uuid: '0178' + String(i).padStart(28, '0'), ip: '1.2.3.4', site_url: 'http://x', now: '2021-11-01T10:00:00.000Z', timestamp: '2021-11-01T10:00:00.000Z', properties: { $current_url: 'http://x/' + i, n: i, nested: { a: [1, 2, 3], b: 'text' } } })
    const started = process.hrtime.bigint()
    for (let i = 0; i < N; i += BATCH) {
        const batch = []
        for (let j = i; j < Math.min(N, i + BATCH); j++) batch.push(event(j))
        await exports_.exportEvents(batch, meta)
        sample()
    }
    const seconds = Number(process.hrtime.bigint() - started) / 1e9
    const listed = await meta.global.s3.listObjectsV2({ Bucket: 'bench', Prefix: 'node/' }).promise()
    console.info(`node ${process.version}: ${N} events, ${listed.KeyCount} objects, ${(N / seconds).toFixed(0)} events/s, peak RSS ${(peak / 1048576).toFixed(1)} MiB`)
})()
