"""The application: the platform's queues on the engine, in one folder per concern."""
