"""Black-box agents: the user's agent talks to the policy through an OpenAI-compatible endpoint.

`conversation.py` records one episode's calls token-exactly, `chat_server.py` serves
`/v1/chat/completions` at an episode-scoped base URL, `episode.py` runs an agent to its reward.
"""
