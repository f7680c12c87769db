// The plugin-library entry points TensorRT looks up when it loads this library
// (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins, Python's get_plugin_registry().load_library):
//     extern "C" void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
//     extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
// Same signature in the 10.3, 10.13 and 11 headers.
#include "prune_plugin.h"
#include "tome_plugin.h"

using namespace nvinfer1;

extern "C" TCEXPORT_API void setLoggerFinder(ILoggerFinder* finder)
{
    tc::set_logger_finder(finder);
}

extern "C" TCEXPORT_API IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static tc::ToMeMergeCreator tome;
    static tc::TokenPruneCreator prune;
    static IPluginCreatorInterface* const creators[] = {&tome, &prune};
    nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
    return creators;
}
