import fetch from 'node-fetch'

export async function processEvent(event) {
    try {
        const response = await fetch('http://127.0.0.1:9/hook')
        event.properties.fetched = response.status
    } catch (error) {
        event.properties.fetch_error = error.message
    }
    return event
}
