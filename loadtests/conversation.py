"""conversation: multi-turn chats whose context grows turn by turn (system + the last N turns)."""

from opskit.loadtest.users import ConversationUser


class Conversation(ConversationUser):
    """One multi-turn chat after another."""
