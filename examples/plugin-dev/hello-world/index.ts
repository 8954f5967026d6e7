import { PluginEvent, PluginMeta } from '@posthog/plugin-scaffold'

type HelloMeta = PluginMeta<{
    config: { greeting: string }
    global: { greeting: string }
}>

export async function setupPlugin({ config, global }: HelloMeta): Promise<void> {
    global.greeting = config.greeting
    console.log(`set up with greeting "${config.greeting}"`)
}

export async function processEvent(event: PluginEvent, { global, cache, storage }: HelloMeta): Promise<PluginEvent> {
    const seen: number = await cache.incr('events_seen')
    await storage.set('last_event', event.event)
    event.properties = { ...event.properties, greeting: global.greeting, events_seen: seen }
    return event
}

export async function onEvent(event: PluginEvent): Promise<void> {
    console.info(`onEvent: ${event.event} from ${event.distinct_id}`)
}
