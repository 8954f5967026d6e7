export async function runEveryMinute({ storage, cache, jobs }) {
    await storage.set('ran', true)
    await cache.lpush('runs', ['minute'])
    await posthog.capture('task_ran', { task: 'runEveryMinute' })
    console.log('runEveryMinute ran')
}

export function processEvent(event) {
    return null
}
