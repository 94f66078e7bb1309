"""The limits every crossrec channel and server share, defined once: the largest message a
server accepts or sends, and how many texts one Embed call carries."""

# Every crossrec server accepts and sends at most 16 MiB per message
# (services/common/serve.py), and every channel, clients' and services' own, says the same.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Texts per Embed call: the embedding server's default --max-texts-per-request. Longer
# lists are cut into calls of this many, sent concurrently (the server batches them).
MAX_TEXTS_PER_EMBED_CALL = 256
