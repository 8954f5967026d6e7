export function processEvent(event) {
    if (event.event === 'explode') {
        throw new Error('boom: cannot handle ' + event.event)
    }
    return event
}
