/* sanitize: MW_SANITIZED is defined in an AddressSanitizer build (GCC says so with
 * __SANITIZE_ADDRESS__, clang with __has_feature). Such a build keeps no recycling lists of
 * its own (the Lua arena, the buffer pool, nghttp2's small blocks): every block goes back to
 * free(), so that ASan sees a use after free or a double free instead of a recycled block. */
#ifndef MW_SANITIZE_H
#define MW_SANITIZE_H

#if defined(__SANITIZE_ADDRESS__)
#define MW_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MW_SANITIZED 1
#endif
#endif

#endif
