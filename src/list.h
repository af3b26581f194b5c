/* list: intrusive doubly linked lists. An object is linked through two of its own fields
 * (PREV, NEXT), so one object can sit in several lists (a socket: the watched ones and the
 * ones with output to write) and leaving a list costs nothing to look up. HEAD is the
 * list's first object (NULL: empty). Lua-free, below every layer. */
#ifndef MW_LIST_H
#define MW_LIST_H

#define MW_LIST_PUSH(head, obj, prev, next) do {                                            \
        (obj)->prev = NULL;                                                                  \
        (obj)->next = (head);                                                                \
        if (head) (head)->prev = (obj);                                                      \
        (head) = (obj);                                                                      \
    } while (0)

#define MW_LIST_UNLINK(head, obj, prev, next) do {                                          \
        if ((obj)->prev) (obj)->prev->next = (obj)->next;                                    \
        else (head) = (obj)->next;                                                           \
        if ((obj)->next) (obj)->next->prev = (obj)->prev;                                    \
        (obj)->prev = (obj)->next = NULL;                                                    \
    } while (0)

#endif
