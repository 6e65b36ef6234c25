"""The application: a chat session over a bounded, merged cache (session, session_file,
chat_template) and the command line (cli)."""
