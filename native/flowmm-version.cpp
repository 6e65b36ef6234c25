#include "flowmm.h"

#define FLOWMM_STR_(x) #x
#define FLOWMM_STR(x)  FLOWMM_STR_(x)

const char * flowmm_version(void) {
    return FLOWMM_STR(FLOWMM_VERSION_MAJOR) "." FLOWMM_STR(FLOWMM_VERSION_MINOR) "." FLOWMM_STR(FLOWMM_VERSION_PATCH);
}

int32_t flowmm_version_number(void) {
    return FLOWMM_VERSION_MAJOR * 10000 + FLOWMM_VERSION_MINOR * 100 + FLOWMM_VERSION_PATCH;
}
