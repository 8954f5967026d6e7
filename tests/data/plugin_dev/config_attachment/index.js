async function processEvent(event, { config, attachments }) {
    event.properties.label = config.label + config.suffix
    event.properties.words = attachments.words ? attachments.words.contents.toString().trim() : null
    event.properties.words_file = attachments.words ? attachments.words.file_name : null
    return event
}
module.exports = { processEvent }
