"""The server's routes, one module per protocol: OpenAI (:mod:`.openai`), TEI (:mod:`.tei`), tembed's native M3
routes (:mod:`.native`) and the public operational ones (:mod:`.ops`)."""
